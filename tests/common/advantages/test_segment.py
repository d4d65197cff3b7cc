"""SPO (arXiv 2505.23564), common/advantages/segment.py and common/losses/prob_mask.py: cut points and segment
advantages by hand and against a plain-loop reference, telescoping, the toy credit-assignment property, whitening,
the tree's values and zero-sum children, the probability-masked loss, degenerate and bad input."""

import pytest
import torch

from common.advantages.segment import (SPOChain, SPOTree, cut_starts, segment_advantages, spo_chain, spo_tree,
                                       whiten)
from common.advantages.group import grpo
from common.batch import RolloutBatch
from common.losses.prob_mask import ProbabilityMaskLoss


def test_cut_starts_on_the_spec_example() -> None:
    # p = [.95, .5, .99, .3, .97, .2]: candidates C = {1, 3, 5}; cut points κ = C − 1 = [0, 2, 4]
    p = torch.tensor([[0.95, 0.5, 0.99, 0.3, 0.97, 0.2]])
    m = torch.ones_like(p, dtype=torch.bool)
    assert cut_starts(p, m, interval=1).nonzero()[:, 1].tolist() == [1, 3, 5]
    assert cut_starts(p, m, interval=2).nonzero()[:, 1].tolist() == [1, 5]  # C[::2]
    m[0, 5] = False  # a padded position is never a candidate
    assert cut_starts(p, m, interval=1).nonzero()[:, 1].tolist() == [1, 3]


def test_segment_advantages_by_hand_and_telescoping() -> None:
    # starts {1, 3, 5}: segments [0..0] (A = 0, κ_1 = 0 ≠ −1), [1, 2], [3, 4], [5]
    # V(1) = .2, V(3) = .6, V(5) = .5, r = 1 -> A = [0, .6−.2, .4, .5−.6, −.1, 1−.5] = [0, .4, .4, −.1, −.1, .5]
    starts = torch.tensor([[False, True, False, True, False, True]])
    values = torch.tensor([[9.0, 0.2, 9.0, 0.6, 9.0, 0.5]])  # entries off the starts are ignored
    A = segment_advantages(torch.tensor([1.0]), starts, values, torch.ones_like(starts))
    torch.testing.assert_close(A, torch.tensor([[0.0, 0.4, 0.4, -0.1, -0.1, 0.5]]))
    # Σ over segments (one token each) = r − V(s_1) = 1 − 0.2
    assert float(A[0, 1] + A[0, 3] + A[0, 5]) == pytest.approx(0.8)
    # a start at token 0 is the prompt state κ = −1: its value is the base. V(0) = .25, V(2) = 1, r = 0
    starts0 = torch.tensor([[True, False, True]])
    A0 = segment_advantages(torch.tensor([0.0]), starts0, torch.tensor([[0.25, 0.0, 1.0]]), torch.ones_like(starts0))
    torch.testing.assert_close(A0, torch.tensor([[0.75, 0.75, -1.0]]))


def reference_segment_advantages(rewards, starts, values, mask):
    """Plain loops over rows and tokens, straight from the paper's definition."""
    B, T = mask.shape
    out = torch.zeros(B, T)
    for i in range(B):
        s = [t for t in range(T) if starts[i, t]]
        v = [float(values[i, t]) for t in s] + [float(rewards[i])]
        for t in range(T):
            if not mask[i, t]:
                continue
            k = sum(1 for x in s if x <= t)  # segment number, 0 before the first start
            out[i, t] = 0.0 if k == 0 else v[k] - v[k - 1]
    return out


def test_segment_advantages_equal_a_plain_loop_reference() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        B, T = 5, 9
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        starts = cut_starts(torch.rand(B, T, generator=g), mask, threshold=0.6, interval=int(torch.randint(1, 4, (1,), generator=g)))
        values, rewards = torch.rand(B, T, generator=g), torch.rand(B, generator=g)
        torch.testing.assert_close(segment_advantages(rewards, starts, values, mask),
                                   reference_segment_advantages(rewards, starts, values, mask))


def test_toy_credit_assignment_only_the_deciding_segment_gets_credit() -> None:
    """text.md §12 (e)(3): segment 1 (tokens 0-3) decides success, segment 2 (tokens 4-7) is noise. With exact
    values V(prompt) = .5, V(after segment 1) = r, SPO gives A ≠ 0 only to segment 1; GRPO gives every token of
    a row the same advantage."""
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])  # right branch, wrong branch, ...
    p = torch.full((4, 8), 0.95)
    p[:, 0] = p[:, 4] = 0.5  # the two decision tokens
    mask = torch.ones(4, 8, dtype=torch.bool)
    starts = cut_starts(p, mask, interval=1)
    values = torch.zeros(4, 8)
    values[:, 0], values[:, 4] = 0.5, r
    A = spo_chain(r, starts, values, mask, p, use_prob_mask=False, whitening=False)
    torch.testing.assert_close(A[:, :4], torch.tensor([0.5, -0.5, 0.5, -0.5])[:, None].expand(4, 4))
    assert (A[:, 4:] == 0).all()
    g = grpo(r, torch.tensor([0, 0, 0, 0]))
    assert (g != 0).all()  # GRPO: segment 2 gets the same nonzero advantage as segment 1


def test_probability_mask_whitening_and_degenerate_cases() -> None:
    # prob mask: only tokens with p < .9 keep an advantage and enter the whitening statistics
    p = torch.tensor([[0.5, 0.95, 0.3], [0.2, 0.99, 0.99]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    starts = cut_starts(p, mask, interval=1)  # (0, 0), (0, 2), (1, 0)
    values = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.0]])
    A = spo_chain(torch.tensor([1.0, 1.0]), starts, values, mask, p, whitening=False)
    # row 0: [1−0, (masked), 1−1]; row 1: [1−.5, masked, masked]
    torch.testing.assert_close(A, torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.0, 0.0]]))
    # whitening over m' = {1, 0, .5}: mean .5, unbiased var .25 -> [1, −1, 0] / sqrt(.25 + 1e-8) · .5 = [1, −1, 0]
    W = spo_chain(torch.tensor([1.0, 1.0]), starts, values, mask, p)
    torch.testing.assert_close(W, torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]), atol=1e-6, rtol=0)
    # no cut point (every p >= .9): all zeros, never NaN
    high = torch.full((2, 3), 0.95)
    Z = spo_chain(torch.tensor([1.0, 0.0]), cut_starts(high, mask), torch.zeros(2, 3), mask, high)
    assert (Z == 0).all()
    # equal advantages whiten to exact zeros; an empty mask gives zeros
    assert (whiten(torch.full((2, 3), 0.1), mask) == 0).all()
    assert (whiten(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool)) == 0).all()


def test_tree_values_and_zero_sum_children() -> None:
    """text.md §12 (e)(4): branching (2, 2), leaf rewards (1, 0, 1, 1): V = (.5, 1), root .75.
    Edge rows: root->a, root->b (V .5, 1; parent 0), a->leaves (1, 0; parent 1), b->leaves (1, 1; parent 2)."""
    values = torch.tensor([0.5, 1.0, 1.0, 0.0, 1.0, 1.0])
    parents = torch.tensor([0, 0, 1, 1, 2, 2])
    A = spo_tree(values, parents)
    torch.testing.assert_close(A, torch.tensor([-0.25, 0.25, 0.5, -0.5, 0.0, 0.0]))
    assert torch.zeros(3).index_add_(0, parents, A).abs().max() == 0  # Σ_children (V(c) − V(parent)) = 0
    # "grpo": divided by the siblings' population std (root's children: .25; a's: .5; b's: 0 -> stays 0)
    torch.testing.assert_close(spo_tree(values, parents, mode="grpo"), torch.tensor([-1.0, 1.0, 1.0, -1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="mode must be"):
        spo_tree(values, parents, mode="gae")


def test_bad_inputs_name_the_argument() -> None:
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="probs .* and mask .* must both be"):
        cut_starts(torch.ones(2, 4), m)
    with pytest.raises(ValueError, match="interval must be"):
        cut_starts(torch.ones(2, 3), m, interval=0)
    with pytest.raises(ValueError, match="starts must lie on valid tokens"):
        segment_advantages(torch.zeros(2), m, torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="rewards must be finite"):
        segment_advantages(torch.tensor([0.0, float("nan")]), m, torch.zeros(2, 3), m)
    with pytest.raises(ValueError, match="num_samples must be"):
        SPOChain(num_samples=0)
    batch = RolloutBatch(prompt_ids=torch.zeros(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1, dtype=torch.bool),
                         completion_ids=torch.zeros(2, 3, dtype=torch.long), completion_mask=m,
                         group_ids=torch.tensor([0, 0]), rewards=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"SPOChain needs RolloutBatch fields \['old_logprobs', 'segment_starts', 'prefix_values'\]"):
        SPOChain()(batch)
    with pytest.raises(ValueError, match=r"SPOTree needs RolloutBatch fields \['old_logprobs'\]"):
        SPOTree()(batch)
    assert SPOChain.requires == ("old_logprobs", "segment_starts", "prefix_values") and SPOTree.requires == ("old_logprobs",)


def test_estimators_are_pure_functions_of_the_batch_fields() -> None:
    """SPOChain on the declared fields equals spo_chain on the same tensors; SPOTree's probability mask reads
    old_logprobs (the by-hand example of test_probability_mask_whitening_and_degenerate_cases)."""
    p = torch.tensor([[0.5, 0.95, 0.3], [0.2, 0.99, 0.99]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    est = SPOChain(interval=1)
    starts = est.starts(p.log(), mask)
    assert starts.tolist() == cut_starts(p, mask, interval=1).tolist()
    values = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.0]])
    batch = RolloutBatch(completion_ids=torch.zeros(2, 3, dtype=torch.long), completion_mask=mask,
                         group_ids=torch.tensor([0, 0]), rewards=torch.tensor([1.0, 1.0]), old_logprobs=p.log(),
                         segment_starts=starts, prefix_values=values)
    torch.testing.assert_close(est(batch), torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]), atol=1e-6, rtol=0)
    # tree: edges (V .5, 1; parent 0), A = (−.25, .25); token 1 of each edge has p ≥ .9 -> masked
    edges = RolloutBatch(completion_ids=torch.zeros(2, 2, dtype=torch.long), completion_mask=torch.ones(2, 2, dtype=torch.bool),
                         group_ids=torch.tensor([0, 0]), rewards=torch.tensor([0.5, 1.0]),
                         old_logprobs=torch.tensor([[0.5, 0.95], [0.3, 0.99]]).log())
    A, keep = SPOTree(whitening=False)(edges)
    assert keep.tolist() == [True, True]
    torch.testing.assert_close(A, torch.tensor([[-0.25, 0.0], [0.25, 0.0]]))


def test_probability_mask_loss_value_and_gradient() -> None:
    # p_old = [.5, .95, .2] -> kept tokens 0 and 2; at ρ = 1 the loss is −mean_kept A = −(1 + 3)/2 = −2
    old = torch.tensor([[0.5, 0.95, 0.2]]).log()
    lp = old.clone().requires_grad_(True)
    A = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = ProbabilityMaskLoss()(lp, old, A, mask)
    assert float(out.loss) == pytest.approx(-2.0)
    out.loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.5, 0.0, -1.5]]))  # −A_t/2 on kept tokens
    empty = ProbabilityMaskLoss()(lp, old, A, torch.zeros_like(mask))
    assert float(empty.loss) == 0.0
    with pytest.raises(ValueError, match="threshold must be"):
        ProbabilityMaskLoss(threshold=0.0)


def test_degenerate_inputs_give_zeros_never_nan() -> None:
    empty = torch.zeros(2, 4, dtype=torch.bool)  # empty completions: no token, no cut point
    p = torch.full((2, 4), 0.5)
    A = spo_chain(torch.tensor([1.0, 0.0]), cut_starts(p, empty), torch.zeros(2, 4), empty, p)
    assert (A == 0).all()
    # equal rewards and equal MC values: every segment difference is 0
    mask = torch.ones(2, 4, dtype=torch.bool)
    A = spo_chain(torch.tensor([0.5, 0.5]), cut_starts(p, mask, interval=2), torch.full((2, 4), 0.5), mask, p)
    assert (A == 0).all()
    # a tree whose siblings all have equal values: no edge is kept, advantages exactly 0
    values, parents = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 1, 1])
    assert (spo_tree(values, parents) == 0).all() and (spo_tree(values, parents, mode="grpo") == 0).all()
