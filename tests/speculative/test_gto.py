"""GTO: the Draft Tree Reward against brute force, its smooth-max bounds, debiased group-standardised advantages,
the clipped ratio to the frozen reference (and the loop's loss part that computes it), and a few real training steps
in which M0 never changes."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from speculative.gto import branch_lengths, gto_advantages, gto_surrogate, tree_reward
from speculative.tree import DraftTree, grow_tree, tree_buffers

PARENTS = torch.tensor([[0, 0, 0, 1, 1, 3]])  # root 0; 1, 2 under the root; 3, 4 under 1; 5 under 3


def hand_tree() -> DraftTree:
    attention, depth, paths, leaves = tree_buffers(PARENTS, max_depth=3)
    return DraftTree(torch.zeros(1, 6, dtype=torch.long), PARENTS, torch.zeros(1, 6), depth, attention, paths, leaves)


def test_tree_reward_equals_brute_force_on_a_hand_made_tree():
    p = torch.tensor([[1.0, 0.5, 0.3, 0.6, 0.2, 0.9]], dtype=torch.float64)  # p_T of each node given its path
    # branches (leaves 2, 4, 5): L = 0.3;  0.5 + 0.5·0.2 = 0.6;  0.5 + 0.5·0.6 + 0.5·0.6·0.9 = 1.07
    r = tree_reward(p, hand_tree(), eta=1.0)
    assert r.item() == pytest.approx(math.log(math.exp(0.3) + math.exp(0.6) + math.exp(1.07)), abs=1e-12)
    assert tree_reward(p, hand_tree(), reduce="max").item() == pytest.approx(1.07)
    assert tree_reward(p, hand_tree(), reduce="mean").item() == pytest.approx((0.3 + 0.6 + 1.07) / 3)
    eta = 3.0
    assert tree_reward(p, hand_tree(), eta=eta).item() == pytest.approx(
        math.log(sum(math.exp(eta * x) for x in (0.3, 0.6, 1.07))) / eta)


def brute_force_branch_lengths(p: torch.Tensor, parents: list[int]) -> dict[int, float]:
    """Plain loop: for every node, walk to the root and sum the running products from the root down."""
    out = {}
    for i in range(1, len(parents)):
        path = [i]
        while path[-1] != 0:
            path.append(parents[path[-1]])
        path = path[::-1][1:]  # root excluded, root -> i
        total, prod = 0.0, 1.0
        for j in path:
            prod *= float(p[j])
            total += prod
        out[i] = total
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_reward_on_grown_trees_matches_the_brute_force_and_lies_within_its_bounds(seed):
    g = torch.Generator().manual_seed(seed)
    V, k, depth = 6, 3, 3
    table = torch.randn(V, V, generator=g).log_softmax(-1)
    tree = grow_tree(lambda t, f, d, a: (f, table[t]), torch.randn(2, V, generator=g).log_softmax(-1),
                     torch.zeros(2, 1), top_k=k, depth=depth, total_tokens=14)
    p = torch.rand(2, tree.num_nodes, generator=g, dtype=torch.float64)
    L_all = branch_lengths(p, tree)
    for b in range(2):
        ref = brute_force_branch_lengths(p[b], tree.parents[b].tolist())
        for i, v in ref.items():
            assert L_all[b, i].item() == pytest.approx(v, abs=1e-12)
        leaf_L = torch.tensor([ref[i] for i in range(1, tree.num_nodes) if tree.leaves[b, i]], dtype=torch.float64)
        for eta in (0.5, 1.0, 4.0):
            r = tree_reward(p, tree, eta=eta)[b].item()
            # max L <= r <= max L + (1/η) log N_leaves
            assert leaf_L.max().item() - 1e-12 <= r <= leaf_L.max().item() + math.log(len(leaf_L)) / eta + 1e-12


def test_advantages_are_group_standardised_after_debiasing():
    g = torch.Generator().manual_seed(0)
    r, r_ref = torch.rand(12, generator=g, dtype=torch.float64), torch.rand(12, generator=g, dtype=torch.float64)
    group_ids = torch.tensor([2, 0, 1, 0, 2, 1, 0, 1, 2, 0, 1, 2])  # interleaved, 3 groups of 4
    adv = gto_advantages(r, r_ref, group_ids, eps=1e-6)
    R = (r - r_ref).tolist()
    for gid in range(3):
        members = [i for i in range(12) if group_ids[i] == gid]
        vals = [R[i] for i in members]
        mean = sum(vals) / 4
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 3)  # unbiased
        for i in members:
            assert adv[i].item() == pytest.approx((R[i] - mean) / (std + 1e-6), abs=1e-9)
    # without debiasing the reference is ignored; a group whose debiased rewards are equal gets exactly 0
    assert not torch.allclose(gto_advantages(r, None, group_ids), adv)
    same = gto_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.5, 2.5]), torch.zeros(3, dtype=torch.long))
    assert torch.equal(same, torch.zeros(3))
    # m = 1: the standardisation would give 0, so the arm uses R itself
    assert torch.allclose(gto_advantages(r, r_ref, torch.arange(12), standardise=False), r - r_ref)


def test_surrogate_uses_the_per_token_ratio_clipped_around_the_reference():
    # rows: (log M − log M0, l, A, group)
    #   0: 2·log 1.1, l=2 -> s = 1.1, A = +1: -min(1.1, 1.1)   = -1.1
    #   1: log 1.5,   l=1 -> s = 1.5, A = +1: -min(1.5, 1.2)   = -1.2   (clipped)
    #   2: 0,         l=0 -> s = 1,   A = -0.5: -min(-0.5, -0.5) = 0.5
    #   3: 3·log 0.5, l=3 -> s = 0.5, A = -1: -min(-0.5, -0.8) = 0.8   (clipped)
    # group means -1.15 and 0.65 -> loss -0.25; clip fraction 2/4
    ref = torch.tensor([-3.0, -2.0, 0.0, -4.0], dtype=torch.float64)
    logp = ref + torch.tensor([2 * math.log(1.1), math.log(1.5), 0.0, 3 * math.log(0.5)], dtype=torch.float64)
    loss, clip = gto_surrogate(logp.requires_grad_(), ref, torch.tensor([2, 1, 0, 3]),
                               torch.tensor([1.0, 1.0, -0.5, -1.0], dtype=torch.float64), torch.tensor([0, 0, 1, 1]))
    assert loss.item() == pytest.approx(-0.25, abs=1e-12) and clip.item() == 0.5
    loss.backward()
    # d/dlogp_0 of -(1/2)(1/2) s_0 A_0 with s_0 = exp(Δ/2): -(1/4)(1/2)(1.1) = -0.1375; clipped rows: 0
    assert logp.grad.tolist() == pytest.approx([-0.1375, 0.0, 0.0, 0.0], abs=1e-12)


def test_the_loops_gto_loss_is_the_surrogate_on_the_hand_rows():
    """GTOLoss (the loop's policy loss: one action per row, log of the per-token geometric mean, M0 as the ratio's
    denominator) on the rows of the test above: ω x (−0.25), clip fraction 1/2, and the same gradient."""
    from common.losses.aggregate import Normaliser
    from speculative.gto import GTOLoss

    ref = torch.tensor([-3.0, -2.0, 0.0, -4.0], dtype=torch.float64)
    length = torch.tensor([2, 1, 0, 3])
    logp = (ref + torch.tensor([2 * math.log(1.1), math.log(1.5), 0.0, 3 * math.log(0.5)], dtype=torch.float64))
    n = length.clamp(min=1).double()
    lp = (logp / n)[:, None].requires_grad_()  # (Bt, 1) what DraftPolicy.forward returns
    mask = torch.ones(4, 1, dtype=torch.bool)
    out = GTOLoss(omega=0.5, clip_eps=0.2)(lp, lp.detach(), torch.tensor([1.0, 1.0, -0.5, -1.0], dtype=torch.float64),
                                         mask, ref_logprobs=(ref / n)[:, None], normaliser=Normaliser.of(mask))
    assert out.loss.item() == pytest.approx(0.5 * -0.25, abs=1e-12) and out.metrics["clip_frac"].item() == 0.5
    out.loss.backward()
    # d/dlp_0 of -(ω/4) s_0 A_0 with s_0 = exp(lp_0 − ref_0): -(0.5/4)(1.1); per summed log-prob: / l_0 = 2.
    # Clipped rows: 0. (Row 2, l = 0: the policy's lp is the constant 0 there, so no parameter gets its gradient.)
    assert (lp.grad[[0, 1, 3], 0] / n[[0, 1, 3]]).tolist() == pytest.approx([-0.5 * 0.1375, 0.0, 0.0], abs=1e-12)
    assert GTOLoss(omega=0.0)(lp, lp, torch.zeros(4), mask).loss.item() == 0.0 and not GTOLoss(omega=0.0).needs_reference


def test_tree_reward_rejects_bad_eta_and_reduce():
    p = torch.ones(1, 6)
    with pytest.raises(ValueError, match="eta must be > 0"):
        tree_reward(p, hand_tree(), eta=0.0)
    with pytest.raises(ValueError, match="reduce must be"):
        tree_reward(p, hand_tree(), reduce="median")


def test_gto_training_moves_the_draft_and_never_the_frozen_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVLAB_CACHE", str(tmp_path))
    from safetensors.torch import load_file

    from speculative.data import MarkovCorpus, MarkovTarget
    from speculative.draft import Draft
    from speculative.gto import accepted_branch, group_roots, path_logprob, prefix_trees, verify_prefix_trees
    from speculative.module import GTOModule, save_draft

    source = MarkovTarget(vocab_size=16, hidden_size=32, seq_len=32, train_steps=3, batch_size=8)
    target, _ = source.load()
    ref_path = tmp_path / "m0.safetensors"
    save_draft(Draft.from_target(target, seed=3), ref_path)
    torch.manual_seed(0)
    module = GTOModule(policy=source, reference=str(ref_path), groups=2, group_size=3, lr=1e-2, top_k=3, depth=2,
                       total_tokens=8)

    # at the start the policy draft is M0, so the ratio along every Ŝ_i is exactly 1
    data = MarkovCorpus(vocab_size=16, seq_len=32, train_size=16, val_size=4, batch_size=4)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    ids = batch["input_ids"]
    with torch.no_grad():
        from speculative.draft import target_features

        feats, logits, out = target_features(module.policy.target, ids, module.policy.layers, use_cache=True)
        seq, roots, gid = group_roots(batch["valid"], 2, 3)
        pos = torch.arange(31).expand(4, 31)
        g0, ctx = module.policy.draft.context(feats[:, :-1], ids[:, 1:], pos)
        tree = prefix_trees(module.policy.draft, ctx, g0, ids, seq, roots, top_k=3, depth=2, total_tokens=8)
        _, choice = verify_prefix_trees(module.policy.target, out.past_key_values, logits, seq, roots, tree)
        tokens, length = accepted_branch(tree, choice)
        g0r, ctxr = module.policy.reference.context(feats[:, :-1], ids[:, 1:], pos)
        assert torch.equal(path_logprob(module.policy.draft, ctx, g0, seq, roots, tokens, length),
                           path_logprob(module.policy.reference, ctxr, g0r, seq, roots, tokens, length))

    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, datamodule=data)
    saved = load_file(str(ref_path))
    ref_state, state = module.policy.reference.state_dict(), module.policy.draft.state_dict()
    for name, value in saved.items():
        assert torch.equal(ref_state[name], value), f"the reference draft's {name} changed"
    moved = [n for n in saved if not torch.equal(state[n], saved[n])]
    assert "fc.weight" in moved and "q_proj.weight" in moved
    assert all(not p.requires_grad for p in module.policy.reference.parameters())
    # the shared loop's module (no training_step of its own), the draft its policy, the target and M0 frozen in it
    from common.module import PolicyOptimizationModule

    assert isinstance(module, PolicyOptimizationModule) and "training_step" not in vars(type(module))
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {
        f"policy.draft.{n}" for n, p in module.policy.draft.named_parameters() if p.requires_grad}
