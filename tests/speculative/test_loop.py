"""Both phases of the speculative domain run through the shared update loop (common/loop.py) with the draft as a
Policy: one step gives the loss and the draft gradients of a plain computation of the paper's objective
(EAGLE-3's TTT token loss; GTO's L = L_token + ω·L_GTO, arXiv 2509.22134 Algorithm 1), written here without the
loop, the policy or its parts, to float32 rounding."""

from __future__ import annotations

import copy

import pytest
import torch

from common.loop import Stepper
from speculative.draft import Draft, target_features, ttt_loss
from speculative.gto import (accepted_branch, group_roots, gto_advantages, gto_surrogate, path_logprob, prefix_trees,
                             tree_reward, verify_prefix_trees)

TREE = dict(top_k=3, depth=2, total_tokens=8)


class Record(torch.optim.Optimizer):
    """An optimiser whose step only records the gradients it is given (the loop's step then zeroes them)."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None):
        self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]


def plain_step(target, draft, m0, layers, batch, *, groups, group_size, ttt_steps, omega, clip_eps):
    """The objective as plain code: target features -> TTT loss [+ ω · L_GTO of the trees at K x m roots]."""
    ids, valid = batch["input_ids"], batch["valid"]
    with torch.no_grad():
        feats, logits, out = target_features(target, ids, layers, use_cache=True)
    loss_token, _ = ttt_loss(draft, feats, logits, ids, valid, ttt_steps)
    if m0 is None:
        return loss_token
    seq, roots, gid = group_roots(valid, groups, group_size)
    pos = torch.arange(ids.shape[1] - 1).expand(ids.shape[0], -1)
    g0, ctx = draft.context(feats[:, :-1], ids[:, 1:], pos)
    with torch.no_grad():
        tree = prefix_trees(draft, (ctx[0].detach(), ctx[1].detach()), g0.detach(), ids, seq, roots, **TREE)
        probs, choice = verify_prefix_trees(target, out.past_key_values, logits, seq, roots, tree)
        g0_ref, ctx_ref = m0.context(feats[:, :-1], ids[:, 1:], pos)
        ref_tree = prefix_trees(m0, ctx_ref, g0_ref, ids, seq, roots, **TREE)
        r_ref = tree_reward(verify_prefix_trees(target, out.past_key_values, logits, seq, roots, ref_tree)[0], ref_tree)
        adv = gto_advantages(tree_reward(probs, tree), r_ref, gid)
        tokens, length = accepted_branch(tree, choice)
        ref_logp = path_logprob(m0, ctx_ref, g0_ref, seq, roots, tokens, length)
    logp = path_logprob(draft, ctx, g0, seq, roots, tokens, length)
    return loss_token + omega * gto_surrogate(logp, ref_logp, length, adv, gid, clip_eps=clip_eps)[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Markov target trained 3 steps, a batch of 4 sequences of 32 tokens, and an M0 file."""
    import os

    tmp = tmp_path_factory.mktemp("spec")
    old = os.environ.get("ADVLAB_CACHE")
    os.environ["ADVLAB_CACHE"] = str(tmp)
    from speculative.data import MarkovCorpus, MarkovTarget
    from speculative.module import save_draft

    source = MarkovTarget(vocab_size=16, hidden_size=32, seq_len=32, train_steps=3, batch_size=8)
    target, _ = source.load()
    if old is None:
        del os.environ["ADVLAB_CACHE"]
    else:
        os.environ["ADVLAB_CACHE"] = old
    save_draft(Draft.from_target(target, seed=3), tmp / "m0.safetensors")
    data = MarkovCorpus(vocab_size=16, seq_len=32, train_size=16, val_size=4, batch_size=4)
    data.setup()
    return source, tmp / "m0.safetensors", next(iter(data.train_dataloader()))


def loop_step(module, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = module.policy.trainable_parameters()
    opt = Record(params)
    got = module.loop.collect(batch)
    metrics = module.loop.update(got.kept, Stepper(opt, params, max_grad_norm=0.0))
    return metrics["loss"], opt.grads


def test_one_gto_step_through_the_loop_is_the_plain_objective(tiny):
    from speculative.module import GTOModule

    source, m0_path, batch = tiny
    module = GTOModule(policy=source, reference=str(m0_path), draft_init=None, seed=1, groups=2, group_size=3, omega=0.5,
                       clip_eps=0.2, ttt_steps=3, **TREE)  # the policy draft starts from M0 ...
    with torch.no_grad():  # ... moved off it, so the ratios, rewards and advantages are not trivially 1 and 0
        for p in module.policy.draft.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    draft = copy.deepcopy(module.policy.draft)
    torch.manual_seed(7)
    loss, grads = loop_step(module, batch)
    torch.manual_seed(7)  # the same group placement
    ref = plain_step(module.policy.target, draft, module.policy.reference, module.policy.layers, batch, groups=2,
                     group_size=3, ttt_steps=3, omega=0.5, clip_eps=0.2)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    params = [p for p in draft.parameters() if p.requires_grad]
    assert len(grads) == len(params)
    for g, p in zip(grads, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    # the GTO term is really in it: the token loss alone has other gradients
    draft.zero_grad()
    torch.manual_seed(7)
    plain_step(module.policy.target, draft, None, module.policy.layers, batch, groups=2, group_size=3, ttt_steps=3,
               omega=0.5, clip_eps=0.2).backward()
    assert not all(torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6) for g, p in zip(grads, params))


def test_one_eagle_step_through_the_loop_is_the_plain_token_loss(tiny):
    from speculative.module import EagleModule

    source, _, batch = tiny
    module = EagleModule(policy=source, ttt_steps=3, seed=2, **TREE)
    draft = copy.deepcopy(module.policy.draft)
    loss, grads = loop_step(module, batch)
    ref = plain_step(module.policy.target, draft, None, module.policy.layers, batch, groups=2, group_size=3,
                     ttt_steps=3, omega=0.0, clip_eps=0.2)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for g, p in zip(grads, [p for p in draft.parameters() if p.requires_grad]):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_the_token_loss_refuses_a_split_step(tiny):
    from common.loop import Loop
    from speculative.module import EagleModule
    from speculative.policy import TokenLoss

    source, _, _ = tiny
    module = EagleModule(policy=source, **TREE)
    with pytest.raises(ValueError, match="micro_batch_size"):
        Loop(module.policy, lambda b: b, module.advantage, module.loss_fn, methods=[TokenLoss(3)], group_size=1,
             micro_batch_size=2)
