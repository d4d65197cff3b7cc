"""DiffusionSamplerPolicy (common/policies/diffusion.py) with tiny real diffusers UNets built from config.

Rollout layout and recomputed log-probs against a hand-wired density, the ratio exactly 1 before the first update
through the real loop for micro-batch sizes 1, 2 and B, the three classifier-free guidance options against gradients
composed by hand, the reference copy, the first-step hook, and a real rollout + optimiser step on a UNet2DModel."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import (DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler, UNet2DConditionModel,
                       UNet2DModel)
from torch import nn

from common.advantages.group import GRPO
from common.batch import RolloutBatch
from common.loop import Loop, Stepper
from common.losses.ppo_clip import ClippedPolicyLoss
from common.methods.base import Method
from common.policies.diffusion import ClassifierFreeGuidance, DiffusionSamplerPolicy, HashPromptEmbedding
from common.sampling.gaussian_step import DDIMStep, FlowSDEStep, LCMStep, seeded_normal

K, SHAPE = 3, (3, 8, 8)
PROMPTS = [{"prompt": "a red cube"}, {"prompt": "a blue sphere"}]
STEPS = {
    "ddim": lambda: DDIMStep(DDIMScheduler(set_alpha_to_one=False, steps_offset=1), K, eta=1.0),
    "lcm": lambda: LCMStep(LCMScheduler(), K),
    "flow": lambda: FlowSDEStep(FlowMatchEulerDiscreteScheduler(shift=3.0), K, noise_level=0.7),
}


def cond_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=8, attention_head_dim=4)


def make_policy(step="ddim", guidance=None, dtype=torch.float64, **kw) -> DiffusionSamplerPolicy:
    pol = DiffusionSamplerPolicy(cond_unet(), STEPS[step](), HashPromptEmbedding((2, 16)), SHAPE, guidance=guidance, **kw)
    return pol.to(dtype)


def reward(b: RolloutBatch) -> RolloutBatch:
    """Brightness of the image (a computable reward), tie-broken so no group is all-equal."""
    r = b.inputs["images"].flatten(1).mean(1).double()
    r = r + 1e-3 * torch.arange(b.batch_size, dtype=r.dtype)
    return b.replace(rewards=r, reward_components=r[:, None], reward_names=("brightness",))


@pytest.mark.parametrize("step", sorted(STEPS))
def test_rollout_layout_and_recomputed_logprobs(step, one_thread):
    """(B, K, C, H, W) actions, x_init = x_T from the seed, (B, K) masks / behaviour log-probs; forward's log-prob of
    row b, step k is the Gaussian density of a[b, k] around the step mean at state s[b, k] (the denoiser called by
    hand), equal to the sampler's own log-probs to float64 rounding; the same seeds give the same trajectories."""
    pol = make_policy(step, ClassifierFreeGuidance(3.0))
    batch = pol.rollout(PROMPTS, 2)
    B = 4
    assert batch.completion_ids.shape == (B, K, *SHAPE) and batch.completion_mask.shape == (B, K)
    assert batch.completion_mask.all() and batch.behaviour_logprobs.shape == (B, K) and batch.seeds.shape == (B,)
    assert batch.group_ids.tolist() == [0, 0, 1, 1] and batch.samples[2]["prompt"] == "a blue sphere"
    torch.testing.assert_close(batch.inputs["x_init"], seeded_normal(batch.seeds, 0, SHAPE, torch.float64), rtol=0, atol=0)
    assert batch.inputs["timesteps"].shape == (B, K) and torch.isfinite(batch.behaviour_logprobs).all()
    out = pol(batch)
    torch.testing.assert_close(out.logprobs, batch.behaviour_logprobs, rtol=0, atol=1e-10)
    states = torch.cat([batch.inputs["x_init"][:, None], batch.completion_ids[:, :-1]], 1)
    uncond = HashPromptEmbedding((2, 16)).encode([""]).double()
    for b, k in ((0, 0), (3, K - 1), (2, 1)):
        x, c = states[b:b + 1, k], batch.inputs["cond"][b:b + 1]
        t = pol.step.model_timesteps[k:k + 1]
        with torch.no_grad():
            e_c, e_u = pol.denoiser(x, t, encoder_hidden_states=c).sample, pol.denoiser(x, t, encoder_hidden_states=uncond).sample
        mean, std = pol.step.stats(e_u + 3.0 * (e_c - e_u), x, torch.tensor([k]))
        hand = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(batch.completion_ids[b:b + 1, k]).mean()
        torch.testing.assert_close(out.logprobs[b, k], hand, rtol=1e-12, atol=1e-12)
    again = pol.sample_batch(batch.inputs["cond"], batch.seeds)
    torch.testing.assert_close(again.completion_ids, batch.completion_ids, rtol=0, atol=0)
    if step == "lcm":  # the reward sees the last step's denoised sample, not the noisy x_next
        assert not torch.equal(batch.inputs["images"], batch.completion_ids[:, -1])
    else:
        torch.testing.assert_close(batch.inputs["images"], batch.completion_ids[:, -1], rtol=0, atol=0)
    greedy = pol.rollout(PROMPTS[:1], 1, greedy=True)  # the mean of each step: log-prob = −log σ − ½ log 2π
    std = pol.step_stats(states[:1, 0], torch.tensor([0]), greedy.inputs["cond"])[1]
    torch.testing.assert_close(greedy.behaviour_logprobs[0, 0], -std.log().flatten()[0] - 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64)))


class RatioRecorder(Method):
    """Records |log π − log π_old| of every micro-batch the update trains on, and the old log-probs it used."""

    def __init__(self):
        super().__init__()
        self.gaps, self.old = [], None

    def loss_inputs(self, loop, micro, out, inputs):
        self.gaps.append((inputs["logprobs"] - inputs["old_logprobs"]).detach().abs().max())
        return {}

    def after_update(self, loop, batch):
        self.old = batch.old_logprobs
        return {}


def test_ratio_is_exactly_one_before_the_first_update_for_any_micro_batching(one_thread):
    """float32, CFG on (detached), mu = 2, minibatch 3 of B = 4 so that old log-probs (micro-batches of the whole
    batch) and the first update (micro-batches of the first minibatch) split rows differently: for micro_batch_size
    1, 2 and B the first minibatch's ratio is exactly 1 (bit-identical log-probs), and the old log-probs are
    identical across the three splits; after the first optimiser step the ratio moves."""
    base = make_policy("ddim", ClassifierFreeGuidance(2.0), dtype=torch.float32)
    batch = None
    olds = []
    for micro in (1, 2, 4):
        pol = copy.deepcopy(base)
        rec = RatioRecorder()
        loop = Loop(pol, reward, GRPO(), ClippedPolicyLoss(), methods=[rec], group_size=2, mu=2, minibatch_size=3,
                    micro_batch_size=micro)
        if batch is None:
            batch = loop.collect(PROMPTS).kept
        opt = torch.optim.SGD(pol.trainable_parameters(), lr=1.0)
        loop.update(batch, Stepper(opt, pol.trainable_parameters(), max_grad_norm=0))
        first = -(-3 // micro)  # micro-batches of the first minibatch, before any optimiser step
        assert all(float(g) == 0.0 for g in rec.gaps[:first]), (micro, rec.gaps)
        assert max(float(g) for g in rec.gaps[first:]) > 0, (micro, rec.gaps)
        olds.append(rec.old)
    assert torch.equal(olds[0], olds[1]) and torch.equal(olds[0], olds[2])
    with torch.no_grad():  # any split or order of the rows: bit-identical per-row log-probs
        full = base(batch).logprobs
        perm = torch.tensor([3, 0, 2, 1])
        assert torch.equal(base(batch.select(perm)).logprobs, full[perm])
        assert torch.equal(torch.cat([base(m).logprobs for m in batch.select(torch.tensor([1, 2, 3])).split(2)]), full[1:])


def hand_cfg_logprob(pol, batch, w, detach_uncond):
    """Σ log-probs with ε̂ = ε_u + w (ε_c − ε_u) composed by hand (ε_u detached or not; w None = conditional only)."""
    a = batch.completion_ids
    B = a.shape[0]
    s = torch.cat([batch.inputs["x_init"][:, None], a[:, :-1]], 1).flatten(0, 1)
    k = torch.arange(K).repeat(B)
    t = pol.step.model_timesteps[k]
    c = batch.inputs["cond"].repeat_interleave(K, 0)
    eps = pol.denoiser(s, t, encoder_hidden_states=c).sample
    if w is not None:
        u = pol.denoiser(s, t, encoder_hidden_states=torch.zeros_like(c)).sample
        u = u.detach() if detach_uncond else u
        eps = u + w * (eps - u)
    mean, std = pol.step.stats(eps, s, k)
    return torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(a.flatten(0, 1)).flatten(1).mean(1).sum()


def grads(pol, loss):
    pol.denoiser.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in pol.trainable_parameters()])


@pytest.mark.parametrize("row_invariant", [True, False])
def test_cfg_options_match_hand_composed_gradients(row_invariant, one_thread):
    """off: the conditional prediction only; detached: the gradient of ε_u.detach() + w (ε_c − ε_u.detach()) (the
    unconditional branch gets none); both: the gradient through both branches. Each equals the hand-composed
    gradient (float64); a hook on the denoiser sees the unconditional call without gradient (detached), with it
    (both) or not at all (off); detached and both differ; scale 1 samples exactly what off samples."""
    options = {"off": (None, None, False), "detached": (ClassifierFreeGuidance(3.0), 3.0, True),
               "both": (ClassifierFreeGuidance(3.0, train_unconditional=True), 3.0, False)}
    got = {}
    batch = make_policy("flow").rollout(PROMPTS, 1)
    for name, (guidance, w, detach) in options.items():
        pol = make_policy("flow", guidance, row_invariant=row_invariant)
        calls = []  # (rows of the unconditional branch, rows of the conditional one, output requires grad) per call

        def record(module, args, kwargs, output):
            null = (kwargs["encoder_hidden_states"] == 0).flatten(1).all(1)
            calls.append((int(null.sum()), int((~null).sum()), output.sample.requires_grad))

        handle = pol.denoiser.register_forward_hook(record, with_kwargs=True)
        g_policy = grads(pol, pol(batch).logprobs.sum())
        handle.remove()
        uncond_grad = {g for u, c, g in calls if u}
        assert {"off": set(), "detached": {False}, "both": {True}}[name] == uncond_grad, (name, calls)
        assert all(g for u, c, g in calls if c)  # the conditional branch always carries the gradient
        g_hand = grads(pol, hand_cfg_logprob(pol, batch, w, detach))
        torch.testing.assert_close(g_policy, g_hand, rtol=1e-9, atol=1e-12)
        got[name] = g_policy
    assert (got["detached"] - got["both"]).abs().max() > 1e-6 and (got["off"] - got["detached"]).abs().max() > 1e-6
    one = make_policy("flow", ClassifierFreeGuidance(1.0)).rollout(PROMPTS, 1)
    torch.manual_seed(0)  # same seeds drawn
    off = make_policy("flow").rollout(PROMPTS, 1)
    assert torch.equal(make_policy("flow").sample_batch(one.inputs["cond"], one.seeds).completion_ids, one.completion_ids)
    cfg = make_policy("flow", ClassifierFreeGuidance(3.0)).sample_batch(off.inputs["cond"], off.seeds)
    assert not torch.allclose(cfg.completion_ids, make_policy("flow").sample_batch(off.inputs["cond"], off.seeds).completion_ids)


def test_reference_is_a_frozen_copy_and_refreshes(one_thread):
    pol = make_policy("lcm")
    batch = pol.rollout(PROMPTS, 2)
    with pytest.raises(RuntimeError, match="enable_reference"):
        pol(batch, reference=True)
    pol.enable_reference()
    before = pol(batch).logprobs.detach()  # frozen weights may take another CPU kernel path: rounding-level equal
    torch.testing.assert_close(pol(batch, reference=True).logprobs, before, rtol=0, atol=1e-12)
    opt = torch.optim.SGD(pol.trainable_parameters(), lr=1.0)
    (-pol(batch).logprobs.sum()).backward()
    opt.step()
    assert (pol(batch).logprobs - before).abs().max() > 1e-6
    torch.testing.assert_close(pol(batch, reference=True).logprobs, before, rtol=0, atol=1e-12)
    kl = pol.step_kl(batch)  # (B, K): closed form, by hand mean (μ − μ_ref)²/(2σ²) at the stored states
    s = torch.cat([batch.inputs["x_init"][:, None], batch.completion_ids[:, :-1]], 1)
    for b, k in ((0, 0), (3, K - 1)):
        kk, c = torch.tensor([k]), batch.inputs["cond"][b:b + 1]
        with torch.no_grad():
            (mu, sd), (mu_ref, _) = pol.step_stats(s[b:b + 1, k], kk, c), pol.step_stats(s[b:b + 1, k], kk, c, reference=True)
        torch.testing.assert_close(kl[b, k], ((mu - mu_ref) ** 2 / (2 * sd ** 2)).mean(), rtol=1e-10, atol=0)
    assert kl.shape == (4, K) and bool((kl > 0).all())
    assert all(not p.requires_grad for p in pol.reference.parameters())
    assert {id(p) for p in pol.trainable_parameters()}.isdisjoint(id(p) for p in pol.reference.parameters())
    pol.refresh_reference(1.0)
    torch.testing.assert_close(pol(batch, reference=True).logprobs, pol(batch).logprobs, rtol=0, atol=1e-12)
    assert float(pol.step_kl(batch).max()) < 1e-20


def test_first_step_hook_replaces_only_the_first_state(one_thread):
    """The hook gets (policy, x_T, cond, seeds) and returns the first transition's state; the stored trajectory
    starts there, the step noises are the same (same seeds), forward rescores it; a wrong shape is refused."""
    pol = make_policy("ddim")
    seen = {}

    def hook(policy, x, cond, seeds):
        seen.update(x=x, cond=cond, seeds=seeds)
        return 0.5 * x

    plain = pol.rollout(PROMPTS, 2)
    hooked = pol.sample_batch(plain.inputs["cond"], plain.seeds, first_step=hook)
    torch.testing.assert_close(seen["x"], plain.inputs["x_init"], rtol=0, atol=0)
    assert torch.equal(seen["seeds"], plain.seeds)
    torch.testing.assert_close(hooked.inputs["x_init"], 0.5 * plain.inputs["x_init"], rtol=0, atol=0)
    assert hooked.completion_ids.shape == plain.completion_ids.shape
    assert not torch.allclose(hooked.completion_ids[:, 0], plain.completion_ids[:, 0])
    torch.testing.assert_close(pol(hooked).logprobs, hooked.behaviour_logprobs, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="first_step must return"):
        pol.sample_batch(plain.inputs["cond"], plain.seeds, first_step=lambda p, x, c, s: x[:, :1])


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="step must be a common.sampling.gaussian_step.StepBuilder"):
        DiffusionSamplerPolicy(cond_unet(), "ddim", HashPromptEmbedding(), SHAPE)
    with pytest.raises(ValueError, match="sample_shape"):
        DiffusionSamplerPolicy(cond_unet(), STEPS["ddim"](), HashPromptEmbedding(), (3, 0, 8))
    with pytest.raises(ValueError, match="guidance"):
        DiffusionSamplerPolicy(cond_unet(), STEPS["ddim"](), HashPromptEmbedding(), SHAPE, guidance=3.0)
    with pytest.raises(ValueError, match="seeds must be"):
        make_policy().sample_batch(torch.zeros(2, 2, 16, dtype=torch.float64), torch.zeros(3, dtype=torch.long))


def test_tiny_unet2dmodel_rollout_and_optimiser_step_through_the_loop(one_thread):
    """A real diffusers UNet2DModel (16x16, two blocks, prompt embedding as class_labels) on the LCM step: rollout,
    rewards, GRPO advantages and one PPO step through Loop.update in float32; the weights move and the sampler
    scores a fixed trajectory with the trained weights."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, class_embed_type="identity")
    pol = DiffusionSamplerPolicy(unet, LCMStep(LCMScheduler(), 2), HashPromptEmbedding((64,)), (3, 16, 16),
                                 guidance=ClassifierFreeGuidance(2.0), condition_kwarg="class_labels")
    loop = Loop(pol, reward, GRPO(), ClippedPolicyLoss(beta=0.01), group_size=2, micro_batch_size=2)
    collected = loop.collect(PROMPTS)
    batch = collected.kept
    assert batch.ref_logprobs is not None and batch.advantages.shape == (4,)
    before = [p.detach().clone() for p in pol.trainable_parameters()]
    lp_before = pol(batch).logprobs.detach()
    opt = torch.optim.AdamW(pol.trainable_parameters(), lr=1e-3)
    metrics = loop.update(batch, Stepper(opt, pol.trainable_parameters(), max_grad_norm=1.0))
    assert torch.isfinite(metrics["loss"]) and float(metrics["grad_norm"]) > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, pol.trainable_parameters()))
    assert (pol.sampler_logprobs(batch) - lp_before).abs().max() > 1e-6
    assert batch.inputs["images"].shape == (4, 3, 16, 16)


def test_scale_override_token_dim_and_a_callable_encoder(one_thread):
    """model_output(scale=w) (zigzag's ω_high / ω_low) combines the branches at w whatever the policy's guidance:
    0 = unconditional, 1 = conditional; a plain callable (P, D) encoder with add_token_dim feeds cross-attention."""
    table = HashPromptEmbedding((16,))
    pol = DiffusionSamplerPolicy(cond_unet(), STEPS["lcm"](), lambda texts: table.encode(texts), SHAPE,
                                 add_token_dim=True).double()
    batch = pol.rollout(PROMPTS, 1)
    assert batch.inputs["cond"].shape == (2, 1, 16)
    x, k, c = batch.inputs["x_init"], torch.zeros(2, dtype=torch.long), batch.inputs["cond"]
    t = pol.step.model_timesteps[k]
    with torch.no_grad():
        e_c = pol.denoiser(x, t, encoder_hidden_states=c).sample
        e_u = pol.denoiser(x, t, encoder_hidden_states=torch.zeros_like(c)).sample
        torch.testing.assert_close(pol.model_output(x, k, c, scale=0.0), e_u, rtol=0, atol=0)
        torch.testing.assert_close(pol.model_output(x, k, c, scale=1.0), e_c, rtol=0, atol=0)
        torch.testing.assert_close(pol.model_output(x, k, c, scale=7.0), e_u + 7.0 * (e_c - e_u), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pol.model_output(x, k, c), e_c, rtol=0, atol=0)  # guidance None: conditional only
