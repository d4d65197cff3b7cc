"""ROMA as a Method on a tiny real VLM (multimodal.roma.toy): the dual forward pass, the worst-case token KL, the
auxiliary PG anchored to clean advantages, the correctness gate, counted generation, checkpointed step."""

import math

import pytest
import torch

from common.advantages.group import GRPO
from common.loop import Loop, Stepper
from common.losses.aggregate import Normaliser
from common.losses.ppo_clip import ClippedPolicyLoss
from multimodal.roma import corruptions as C
from multimodal.roma import toy
from multimodal.roma.method import ROMA, worst_case_token_kl


def k3(d):
    return math.exp(d) - d - 1


def test_worst_case_token_kl_by_hand():
    lp_clean = torch.tensor([[-1.0, -2.0, -0.5]])  # (1, 3)
    lp_views = torch.tensor([[[-1.5, -2.0, -0.5],  # view 0: differs at t=0 only (δ = −0.5)
                              [-1.0, -1.0, -0.5],  # view 1: differs at t=1 only (δ = +1.0)
                              [-1.2, -2.3, -0.5]]])  # view 2: small at t=0 and t=1
    mask = torch.tensor([[True, True, False]])
    D = torch.tensor([[[k3(-0.5), 0.0, 0.0], [0.0, k3(1.0), 0.0], [k3(-0.2), k3(-0.3), 0.0]]])  # (1, 3, 3) by hand
    kl, chosen = worst_case_token_kl(lp_clean, lp_views, mask, "token")
    torch.testing.assert_close(kl, D.max(1).values * mask, rtol=0, atol=1e-6)
    per_sample = D.sum(2) / 2  # (1, 3): 0.1065, 0.359, 0.0634 -> view 1 is the worst sample
    assert int(chosen) == int(per_sample.argmax()) == 1
    kl_s, _ = worst_case_token_kl(lp_clean, lp_views, mask, "sample")
    torch.testing.assert_close(kl_s, D[:, 1] * mask, rtol=0, atol=1e-6)
    kl_m, _ = worst_case_token_kl(lp_clean, lp_views, mask, "mean")
    torch.testing.assert_close(kl_m, D.mean(1) * mask, rtol=0, atol=1e-6)
    # gradients reach the corrupted branch only
    lc, lv = lp_clean.clone().requires_grad_(), lp_views.clone().requires_grad_()
    worst_case_token_kl(lc, lv, mask)[0].sum().backward()
    assert lc.grad is None and lv.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="worst must be"):
        worst_case_token_kl(lp_clean, lp_views, mask, "median")


def test_worst_view_is_the_argmax_of_the_per_sample_kl_on_random_rows():
    g = torch.Generator().manual_seed(0)
    lp_clean = -torch.rand(6, 5, generator=g) * 3
    lp_views = lp_clean[:, None] + torch.randn(6, 4, 5, generator=g)
    mask = torch.rand(6, 5, generator=g) > 0.3
    mask[:, 0] = True
    _, chosen = worst_case_token_kl(lp_clean, lp_views, mask, "sample")
    for b in range(6):  # plain loop reference
        kls = [sum(k3(float(lp_views[b, k, t] - lp_clean[b, t])) for t in range(5) if mask[b, t]) for k in range(4)]
        assert int(chosen[b]) == max(range(4), key=lambda k: kls[k])


@pytest.fixture(scope="module")
def prompts():
    return [toy.render(0, i) for i in range(4)]


def make_loop(policy, method, **kw):
    return Loop(policy, toy.score, GRPO(), ClippedPolicyLoss(aggregation="token_mean"), methods=[method], group_size=4,
                provided=("correct",), **kw)


def collected(policy, method, prompts, **kw):
    torch.manual_seed(0)
    loop = make_loop(policy, method, **kw)
    return loop, loop.collect(prompts).kept


def test_views_are_recorded_deterministic_and_the_dual_pass_is_a_plain_forward_on_them(prompts):
    policy = toy.TinyVLMPolicy(seed=0)
    roma = ROMA(num_views=3, seed=7)
    loop, batch = collected(policy, roma, prompts)
    B = batch.batch_size
    assert batch.inputs["roma_views"].shape == (B, 3, 3, 16, 16)
    kinds, levels, keys = batch.inputs["roma_kind"], batch.inputs["roma_level"], batch.inputs["roma_key"]
    assert kinds.shape == (B, 3) and set(kinds.unique().tolist()) <= {0, 1, 2, 3}  # the seen set
    # the key is (seed, sample, step, view): prompt uid · 2^20 + row, step 0
    sample = batch.prompt_uid * (1 << 20) + torch.arange(B)
    assert torch.equal(keys, C.view_keys(7, sample, 0, 3))
    clean = batch.inputs["pixel_values"]
    for k in range(3):  # each view is the recorded corruption of the clean image
        expect = C.corrupt(clean, kinds[:, k], levels[:, k], keys[:, k])
        torch.testing.assert_close(batch.inputs["roma_views"][:, k], expect)
        plain = policy(batch.replace(inputs={"pixel_values": expect})).logprobs
        torch.testing.assert_close(roma.view_logprobs(loop, batch)[:, k], plain, rtol=0, atol=1e-6)
    again = roma.views(clean, sample, 0)
    assert all(torch.equal(again[n], batch.inputs[n]) for n in again)
    assert not torch.equal(roma.views(clean, sample, 1)["roma_key"], keys)  # another step, other views
    rec = C.describe(int(kinds[0, 0]), int(levels[0, 0]), int(keys[0, 0]))
    assert rec["corruption"] in C.SEEN


def test_no_generation_on_corrupted_views_and_the_step_is_checkpointed(prompts):
    policy = toy.TinyVLMPolicy(seed=0)
    roma = ROMA(num_views=3)
    forwarded = []
    real_forward = policy.forward
    policy.forward = lambda batch, **kw: (forwarded.append(batch.batch_size), real_forward(batch, **kw))[1]
    loop, batch = collected(policy, roma, prompts)
    assert policy.generate_calls == 1  # the clean rollout only
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    forwarded.clear()
    metrics = loop.update(batch, Stepper(opt, policy.trainable_parameters()))
    assert policy.generate_calls == 1  # the update generated nothing: corrupted views are teacher-forced
    assert forwarded == [16, 16 * 3]  # one clean forward, one forward of the 3 views of every row
    assert {"roma/kl", "roma/aux_loss", "roma/gated_frac"} <= set(metrics)
    assert int(roma.step) == 1 and "step" in dict(roma.named_buffers())
    state = roma.state_dict()
    fresh = ROMA(num_views=3)
    fresh.load_state_dict(state)
    assert int(fresh.step) == 1  # resumed: the next step draws the views a continuous run would


def _extra(roma, loop, batch):
    out = loop.policy(batch)
    return roma.extra_loss(loop, batch, out, Normaliser.of(batch.loss_mask)), out


def test_regulariser_is_zero_on_incorrect_trajectories_and_gated_per_term(prompts):
    policy = toy.TinyVLMPolicy(seed=0)
    roma = ROMA(num_views=2, kl_coef=1.0, aux_coef=1.0)
    loop, batch = collected(policy, roma, prompts)
    batch = batch.replace(advantages=torch.linspace(-1, 1, batch.batch_size))
    wrong = batch.replace(correct=torch.zeros(batch.batch_size, dtype=torch.bool))
    res, _ = _extra(roma, loop, wrong)
    assert float(res.loss) == 0.0 and float(res.metrics["roma/gated_frac"]) == 0.0
    res.loss.backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0.0 for p in policy.parameters())
    assert float(res.metrics["roma/kl_all"]) > 0  # there was something to regularise
    # one correct row: the terms are that row's alone, divided by the token count of the whole batch
    one = torch.zeros(batch.batch_size, dtype=torch.bool)
    one[5] = True
    res, out = _extra(roma, loop, batch.replace(correct=one))
    lp_views = roma.view_logprobs(loop, batch)
    m = batch.loss_mask
    kl_row = worst_case_token_kl(out.logprobs, lp_views, m)[0][5].sum()
    aux_row = -(batch.advantages[5] * m[5]).sum()  # ratio 1 at mu = 1: −A per token
    torch.testing.assert_close(res.loss.detach(), (kl_row + aux_row).detach() / m.sum(), rtol=1e-5, atol=1e-6)
    # gates off: incorrect rows count too
    loose = ROMA(num_views=2, kl_coef=1.0, aux_coef=0.0, gate_kl=False)
    res, _ = _extra(loose, loop, wrong.replace(inputs=batch.inputs))
    assert float(res.loss) > 0


def test_aux_term_is_reinforce_on_the_corrupted_view_with_clean_advantages(prompts):
    policy = toy.TinyVLMPolicy(seed=0)
    roma = ROMA(num_views=2, kl_coef=0.0, aux_coef=1.0, gate_aux=False)
    loop, batch = collected(policy, roma, prompts)
    res, _ = _extra(roma, loop, batch)
    grads = torch.autograd.grad(res.loss, list(policy.net.parameters()), allow_unused=True)
    view0 = batch.replace(inputs={"pixel_values": batch.inputs["roma_views"][:, 0]})
    m = batch.loss_mask
    ref = -(batch.advantages[:, None] * policy(view0).logprobs * m).sum() / m.sum()  # plain REINFORCE on view 0
    ref_grads = torch.autograd.grad(ref, list(policy.net.parameters()), allow_unused=True)
    for a, b in zip(grads, ref_grads):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_old_view_logprobs_are_recorded_before_the_update_when_the_policy_moves_first(prompts):
    policy = toy.TinyVLMPolicy(seed=0)
    roma = ROMA(num_views=2)
    loop, batch = collected(policy, roma, prompts, mu=2)
    old = batch.inputs["roma_old_logprobs"]  # (B, 2, T)
    assert old.shape == (16, 2, toy.T_MAX)
    torch.testing.assert_close(old, roma.view_logprobs(loop, batch).detach())
    _, plain = collected(toy.TinyVLMPolicy(seed=0), ROMA(num_views=2), prompts)
    assert "roma_old_logprobs" not in plain.inputs  # one step per rollout: ρ = 1, nothing to record


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_views must be >= 1"):
        ROMA(num_views=0)
    with pytest.raises(ValueError, match="corruptions must be a non-empty list"):
        ROMA(corruptions=["fog"])
    with pytest.raises(ValueError, match="severity levels"):
        ROMA(min_level=4, max_level=2)
    with pytest.raises(ValueError, match="worst must be"):
        ROMA(worst="max")
    roma = ROMA()
    batch = toy.TinyVLMPolicy(seed=0).rollout([toy.render(0, 0)], 2)
    with pytest.raises(ValueError, match="image_key"):
        ROMA(image_key="image").after_score(None, batch)
    assert roma.requires == ("correct",) and ROMA(gate="reward").requires == ()


def test_several_images_per_row_get_the_rows_view_and_normalisation_round_trips():
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, 2, 3, 8, 8, generator=g)  # (B, N images, C, H, W) in [0, 1]
    roma = ROMA(num_views=2, pixel_mean=0.5, pixel_std=0.5, corruptions=["contrast"], min_level=3, max_level=3)
    out = roma.views((pixels - 0.5) / 0.5, torch.arange(3), 0)
    assert out["roma_views"].shape == (3, 2, 2, 3, 8, 8)
    for b in range(3):
        for k in range(2):
            for n in range(2):  # contrast 0.4 about each image's own mean, then back to the policy's normalisation
                img = pixels[b, n]
                expect = ((img - img.mean()) * 0.4 + img.mean() - 0.5) / 0.5
                torch.testing.assert_close(out["roma_views"][b, k, n], expect, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"inputs\['pixel_values'\] must be"):
        roma.views(torch.zeros(3, 8, 8), torch.arange(3), 0)
