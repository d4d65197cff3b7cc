"""GAE / EGAE (T-PPO, arXiv 2506.15050): hand values, a plain-loop reference, truncation, degenerate and bad input."""

from __future__ import annotations

import pytest
import torch

from common.advantages.gae import EGAE, discounted_cumsum, egae, value_targets
from common.batch import RolloutBatch
from common.critic import ValueHead, value_loss


def reference_egae(rewards, values, lengths, truncated, gamma, lam):
    """Plain loops over rows and tokens: the textbook backward recursion Â_t = δ_t + γλ Â_{t+1}."""
    B, T = values.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        L = int(lengths[i])
        running = 0.0
        for t in reversed(range(L)):
            if t == L - 1:
                v_next = float(values[i, t]) if truncated[i] else 0.0
                r = 0.0 if truncated[i] else float(rewards[i])
            else:
                v_next, r = float(values[i, t + 1]), 0.0
            delta = r + gamma * v_next - float(values[i, t])
            running = delta + gamma * lam * running
            out[i, t] = running
    return out


def prefix_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.as_tensor(lengths)[:, None]


def test_hand_computed_complete_and_truncated_rows():
    values = torch.tensor([[0.5, 0.25, 0.75], [0.5, 0.25, 9.0]])
    mask = prefix_mask([3, 2], 3)
    adv = egae(torch.tensor([1.0, 1.0]), values, mask, torch.tensor([False, True]), gamma=1.0, lam=0.5)
    # complete: δ = (0.25−0.5, 0.75−0.25, 1−0.75) = (−0.25, 0.5, 0.25); Â2 = 0.25, Â1 = 0.5 + 0.5·0.25 = 0.625,
    #           Â0 = −0.25 + 0.5·0.625 = 0.0625
    # truncated (l = 2, its reward ignored): δ1 = V1 − V1 = 0, δ0 = 0.25 − 0.5 = −0.25 -> (−0.25, 0, 0)
    torch.testing.assert_close(adv, torch.tensor([[0.0625, 0.625, 0.25], [-0.25, 0.0, 0.0]]))
    adv = egae(torch.tensor([1.0]), values[1:], mask[1:], torch.tensor([True]), gamma=0.5, lam=1.0)
    # γ = 0.5: δ1 = 0.5·0.25 − 0.25 = −0.125; δ0 = 0.5·0.25 − 0.5 = −0.375; Â0 = −0.375 + 0.5·(−0.125) = −0.4375
    torch.testing.assert_close(adv, torch.tensor([[-0.4375, -0.125, 0.0]]))


def test_matches_a_plain_loop_on_random_rows():
    g = torch.Generator().manual_seed(0)
    B, T = 12, 9
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    truncated = torch.rand(B, generator=g) < 0.5
    rewards, values = torch.randn(B, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    for gamma, lam in ((1.0, 0.95), (0.9, 0.7), (1.0, 1.0), (0.99, 0.0)):
        got = egae(rewards, values, prefix_mask(lengths, T), truncated, gamma=gamma, lam=lam)
        torch.testing.assert_close(got, reference_egae(rewards, values, lengths, truncated, gamma, lam))


def test_egae_on_a_complete_row_is_gae_and_lambda_one_gae_is_the_return_minus_the_value():
    values = torch.tensor([[0.2, -0.4, 0.9, 0.1]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    adv = egae(torch.tensor([2.0]), values, mask, torch.tensor([False]), gamma=0.9, lam=1.0)
    targets, vmask = value_targets(torch.tensor([2.0]), mask, torch.tensor([False]), gamma=0.9)
    # G_t = 0.9^{3−t}·2 = (1.458, 1.62, 1.8, 2); GAE(λ=1) = G − V
    torch.testing.assert_close(targets, torch.tensor([[1.458, 1.62, 1.8, 2.0]]))
    torch.testing.assert_close(adv, targets - values)
    assert bool(vmask.all())


def test_exact_values_give_zero_mean_advantage_on_truncated_rows():
    """The defining property on a two-token tree: V exact -> E[Â_0] = 0 for both complete and truncated rows."""
    # s0 -> token a (p = 0.5) or b; after a the outcome is 1 w.p. 0.8, after b w.p. 0.2. V(s0) = 0.5,
    # V(s0+a) = 0.8, V(s0+b) = 0.2. Truncated after 1 token: Â_0 = γλ·0 + V(s1) − V(s0) (γ = 1, δ_1 = 0).
    values = torch.tensor([[0.5, 0.8], [0.5, 0.2]])
    mask = torch.tensor([[True, True], [True, True]])
    truncated_adv = egae(torch.zeros(2), values[:, :1], mask[:, :1], torch.ones(2, dtype=torch.bool), gamma=1.0, lam=1.0)
    # with one token and truncation Â_0 = V(s0) − V(s0) = 0 for both; with two tokens and truncation at l = 2:
    two = egae(torch.zeros(2), values, mask, torch.ones(2, dtype=torch.bool), gamma=1.0, lam=1.0)
    torch.testing.assert_close(truncated_adv, torch.zeros(2, 1))
    torch.testing.assert_close(two[:, 0], torch.tensor([0.3, -0.3]))  # mean 0 over the equally likely branches
    assert float(two[:, 0].mean()) == pytest.approx(0.0, abs=1e-7)


def test_degenerate_rows_empty_and_zero_values():
    mask = prefix_mask([0, 3], 3)
    adv = egae(torch.tensor([1.0, 0.0]), torch.zeros(2, 3), mask, torch.tensor([False, False]))
    torch.testing.assert_close(adv, torch.zeros(2, 3))  # empty row: 0; reward 0 with V = 0: 0
    assert torch.isfinite(adv).all()
    targets, vmask = value_targets(torch.tensor([1.0, 1.0]), mask, torch.tensor([False, True]))
    assert not bool(vmask.any()) and bool((targets == 0).all())  # empty row and truncated row: nothing to fit


def test_value_loss_gets_no_gradient_from_truncated_rows():
    head = ValueHead(4)
    h = torch.randn(2, 3, 4)
    mask = prefix_mask([3, 3], 3)
    truncated = torch.tensor([False, True])
    targets, vmask = value_targets(torch.tensor([1.0, 1.0]), mask, truncated)
    # ½ Σ (0 − 1)² / 6 over the 3 complete tokens at V = 0 (the head starts at zero): 3·0.5/6 = 0.25
    assert float(value_loss(head(h), targets, vmask, mask.sum().float())) == pytest.approx(0.25)
    torch.nn.init.constant_(head.net[-1].weight, 0.1)
    h.requires_grad_(True)
    value_loss(head(h), targets, vmask, mask.sum().float()).backward()
    assert bool((h.grad[1] == 0).all()) and bool((h.grad[0] != 0).all())


def test_discounted_cumsum_hand_values():
    # y = (1 + 0.5·2 + 0.25·4, 2 + 0.5·4, 4) = (3, 4, 4)
    torch.testing.assert_close(discounted_cumsum(torch.tensor([[1.0, 2.0, 4.0]]), 0.5), torch.tensor([[3.0, 4.0, 4.0]]))


def test_bad_inputs_name_the_argument():
    mask = prefix_mask([2], 3)
    with pytest.raises(ValueError, match="values"):
        egae(torch.ones(1), torch.zeros(2, 3), mask, torch.tensor([False]))
    with pytest.raises(ValueError, match="prefix"):
        egae(torch.ones(1), torch.zeros(1, 3), torch.tensor([[True, False, True]]), torch.tensor([False]))
    with pytest.raises(ValueError, match="gamma"):
        egae(torch.ones(1), torch.zeros(1, 3), mask, torch.tensor([False]), gamma=1.5)
    with pytest.raises(ValueError, match="finite"):
        egae(torch.tensor([float("nan")]), torch.zeros(1, 3), mask, torch.tensor([False]))
    with pytest.raises(ValueError, match="truncated"):
        egae(torch.ones(1), torch.zeros(1, 3), mask, torch.tensor([0]))
    batch = RolloutBatch(prompt_ids=torch.zeros(1, 1, dtype=torch.long), prompt_mask=torch.ones(1, 1, dtype=torch.bool),
                         completion_ids=torch.zeros(1, 3, dtype=torch.long), completion_mask=mask,
                         group_ids=torch.zeros(1, dtype=torch.long), rewards=torch.ones(1))
    with pytest.raises(ValueError, match="values"):
        EGAE()(batch)
    with pytest.raises(ValueError, match="hidden_size"):
        ValueHead(0)
