"""HAPO token-level group average (common/advantages/hapo.py): the spec's hand values, token-level
unbiasedness vs GRPO, the |A| >= 5 fallback, a plain-loop reference on ragged groups, degenerate groups."""

import pytest
import torch

from common.advantages.group import grpo
from common.advantages.hapo import HAPOAdvantage, hapo_advantage
from common.batch import RolloutBatch


def test_spec_hand_values_and_token_level_unbiasedness() -> None:
    # r = (1,1,0,0), L = (100,400,50,800): ΣL = 1350, μ = 500/1350 = 0.370370, σ² = μ(1 − μ) = 0.233196,
    # σ = 0.482904; A+ = 0.629630/0.482904 = 1.3038, A− = −0.370370/0.482904 = −0.7670
    r = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    L = torch.tensor([100, 400, 50, 800])
    g = torch.zeros(4, dtype=torch.long)
    A = hapo_advantage(r, L, g)
    torch.testing.assert_close(A, torch.tensor([1.3038, 1.3038, -0.7670, -0.7670], dtype=torch.float64), atol=1e-4, rtol=0)
    assert abs((L * A).sum().item()) < 1e-9  # Σ L_i A_i = 0
    # GRPO: A = ±0.866 (std ddof=1 = 0.57735), Σ L_i A_i = 0.866·(500 − 850) = −303.1
    A_grpo = grpo(r, g)
    assert (L * A_grpo).sum().item() == pytest.approx(-303.1, abs=0.05)


def test_fallback_to_grpo_for_a_long_outlier() -> None:
    # r = (1,0,0,0), L = (1000,10,10,10): μ = 1000/1030 = 0.97087, σ = sqrt(μ(1 − μ)) = 0.16816,
    # A_wrong = −0.97087/0.16816 = −5.7735: |A| >= 5 → the group takes GRPO's (0.75, −0.25·3)/0.5 = (1.5, −0.5, ...)
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    L = torch.tensor([1000, 10, 10, 10, 5, 7])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    A = hapo_advantage(r, L, g)
    torch.testing.assert_close(A[:4], torch.tensor([1.5, -0.5, -0.5, -0.5], dtype=torch.float64), atol=1e-5, rtol=0)
    # group 1 keeps the token-level value: μ = 5/12, σ = sqrt(μ(1 − μ)), A = (1 − μ)/σ, −μ/σ
    mu = 5 / 12
    sigma = (mu * (1 - mu)) ** 0.5
    torch.testing.assert_close(A[4:], torch.tensor([(1 - mu) / sigma, -mu / sigma], dtype=torch.float64), atol=1e-5, rtol=0)
    # a larger threshold keeps the token-level advantage
    assert hapo_advantage(r, L, g, fallback_threshold=10.0)[1].item() == pytest.approx(-5.7735, abs=1e-4)


def naive(r, L, g, eps=1e-6, thr=5.0):
    out = torch.zeros_like(r)
    for k in torch.unique(g).tolist():
        idx = (g == k).nonzero().flatten()
        rr, ll = r[idx], L[idx].double()
        mu = (ll * rr).sum() / ll.sum()
        sigma = ((ll * (rr - mu) ** 2).sum() / ll.sum()).sqrt()
        a = (rr - mu) / (sigma + eps) if sigma > 0 else torch.zeros_like(rr)
        if (a.abs() >= thr).any():
            a = (rr - rr.mean()) / (rr.std() + eps) if len(rr) > 1 and rr.std() > 0 else torch.zeros_like(rr)
        out[idx] = a
    return out


@pytest.mark.parametrize("seed", range(5))
def test_matches_plain_loop_on_ragged_interleaved_groups(seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    B = 17
    g = torch.randint(0, 5, (B,), generator=gen)
    r = torch.randint(0, 2, (B,), generator=gen).double()
    L = torch.randint(1, 300, (B,), generator=gen)
    A = hapo_advantage(r, L, g)
    torch.testing.assert_close(A, naive(r, L, g), atol=1e-9, rtol=1e-9)
    for k in torch.unique(g).tolist():  # token-level unbiasedness where no fallback fired
        m = g == k
        if (A[m].abs() < 5).all() and torch.allclose(A[m], naive(r, L, g, thr=1e9)[m]):
            assert abs((L[m] * A[m]).sum().item()) < 1e-6


def test_degenerate_groups_give_zero() -> None:
    r = torch.tensor([0.3, 0.3, 0.3, 1.0, 0.5], dtype=torch.float32)
    L = torch.tensor([10, 20, 30, 5, 0])
    g = torch.tensor([0, 0, 0, 1, 2])  # all-equal, size one, an empty completion alone
    A = hapo_advantage(r, L, g)
    assert torch.equal(A, torch.zeros(5))


def test_class_reads_the_batch_and_bad_inputs() -> None:
    mask = torch.arange(4)[None, :] < torch.tensor([4, 2, 1, 3])[:, None]
    batch = RolloutBatch(prompt_ids=torch.zeros(4, 1, dtype=torch.long), prompt_mask=torch.ones(4, 1, dtype=torch.bool),
                         completion_ids=torch.zeros(4, 4, dtype=torch.long), completion_mask=mask,
                         group_ids=torch.tensor([0, 1, 0, 1]), rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(HAPOAdvantage()(batch), hapo_advantage(batch.rewards, mask.sum(1), batch.group_ids))
    with pytest.raises(ValueError, match="eps"):
        HAPOAdvantage(eps=-1.0)
    with pytest.raises(ValueError, match="fallback_threshold"):
        HAPOAdvantage(fallback_threshold=0.0)
    with pytest.raises(ValueError, match="lengths"):
        hapo_advantage(torch.zeros(3), torch.zeros(2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="lengths"):
        hapo_advantage(torch.zeros(2), torch.tensor([1, -1]), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="finite"):
        hapo_advantage(torch.tensor([1.0, float("nan")]), torch.tensor([1, 1]), torch.zeros(2, dtype=torch.long))
