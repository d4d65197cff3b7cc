"""IcePop's two-sided band and sequence-level masking in the rollout correction (common/losses/correction.py),
against hand computations on the same two rows as test_correction.py."""

from __future__ import annotations

import math

import pytest
import torch

from common.batch import RolloutBatch
from common.losses.correction import RolloutCorrection, importance_weights
from common.losses.ppo_clip import ClippedPolicyLoss

E = math.e

# Row 0: log w = [1, 0, −2] -> token ratios w = [e, 1, e^-2]; Σ = −1, geometric mean e^(−1/3) = 0.7165
# Row 1: log w = [ln 3, 0, pad] -> w = [3, 1];               Σ = ln 3, geometric mean √3 = 1.7321
OLD = torch.tensor([[0.0, -1.0, -2.0], [math.log(3.0) - 1.0, -0.5, 0.0]])
MU = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, -0.5, 0.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])


def test_icepop_band_masks_both_sides_by_hand():
    # IcePop α = 0.5, β = 5: e and 1 and 3 lie in the band (kept with their ratio), e^-2 = 0.135 < 0.5 -> 0
    w, capped = importance_weights(OLD, MU, MASK, mode="mask", lower=0.5, cap=5.0)
    torch.testing.assert_close(w, torch.tensor([[E, 1.0, 0.0], [3.0, 1.0, 0.0]]))
    assert capped.tolist() == [[False, False, True], [False, False, False]]
    # β = 2 as well: the ratios above it (e, 3) are masked too, only the 1s survive
    w, capped = importance_weights(OLD, MU, MASK, mode="mask", lower=0.5, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    assert capped.tolist() == [[True, False, True], [True, False, False]]


def test_lower_bound_with_truncation_and_at_sequence_level_by_hand():
    # truncate above C = 2, mask below α = 0.5: row 0 [min(e, 2), 1, 0], row 1 [min(3, 2), 1]
    w, _ = importance_weights(OLD, MU, MASK, mode="truncate", lower=0.5, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]]))
    # sequence level: row 0's weight e^-1 = 0.368 < 0.5 -> the whole row 0; row 1's 3 -> truncated to 2
    w, _ = importance_weights(OLD, MU, MASK, level="sequence", mode="truncate", lower=0.5, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 0.0]]))


def test_sequence_mask_any_and_geometric_by_hand():
    # "any" with the band [0.5, 5]: row 0 holds e^-2 (outside) -> dropped whole; row 1 (3, 1) inside -> its weights
    w, capped = importance_weights(OLD, MU, MASK, mode="mask", lower=0.5, cap=5.0, sequence_mask="any")
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 0.0], [3.0, 1.0, 0.0]]))
    assert capped.tolist() == [[True, True, True], [False, False, False]]
    # "any" judges token ratios even at sequence level: row 1's product 3 is kept (cap 5), row 0 still dropped
    w, _ = importance_weights(OLD, MU, MASK, level="sequence", mode="mask", lower=0.0, cap=5.0, sequence_mask="any",
                              sequence_bounds=(0.5, 5.0))
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 0.0], [3.0, 3.0, 0.0]]))
    # geometric means 0.7165 and 1.7321: band [0.5, 1.5] drops row 1 only (token weights: TIS with C = 2)
    w, _ = importance_weights(OLD, MU, MASK, cap=2.0, sequence_mask="geometric", sequence_bounds=(0.5, 1.5))
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, E**-2], [0.0, 0.0, 0.0]]))
    # band [0.75, 1.8] drops row 0 only; [0.7, 1.8] keeps both
    w, _ = importance_weights(OLD, MU, MASK, cap=2.0, sequence_mask="geometric", sequence_bounds=(0.75, 1.8))
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 0.0], [2.0, 1.0, 0.0]]))
    w, _ = importance_weights(OLD, MU, MASK, cap=2.0, sequence_mask="geometric", sequence_bounds=(0.7, 1.8))
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, E**-2], [2.0, 1.0, 0.0]]))


def _batch(mu: torch.Tensor, mask: torch.Tensor) -> RolloutBatch:
    B, T = mask.shape
    return RolloutBatch(prompt_ids=torch.ones(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
                        completion_ids=torch.ones(B, T, dtype=torch.long), completion_mask=mask,
                        group_ids=torch.zeros(B, dtype=torch.long), behaviour_logprobs=mu)


def test_icepop_loss_gradient_and_metrics_by_hand():
    """π = π_old (ratio 1): the token-mean loss is −Σ A·w̃ / N and d loss / dℓ_it = −A_i·w̃_it / N; a masked token
    gets exactly zero gradient."""
    loss_fn = RolloutCorrection(ClippedPolicyLoss(aggregation="token_mean"), mode="mask", lower=0.5, cap=5.0)
    logprobs = OLD.clone().requires_grad_(True)
    A = torch.tensor([1.0, -2.0])
    out = loss_fn(logprobs, OLD, A, MASK, batch=_batch(MU, MASK))
    # w̃ = [[e, 1, 0], [3, 1, -]], N = 5: loss = −(1·(e + 1) − 2·(3 + 1)) / 5
    torch.testing.assert_close(out.loss, torch.tensor(-((E + 1) - 8) / 5))
    out.loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-E / 5, -1 / 5, 0.0], [6 / 5, 2 / 5, 0.0]]))
    assert logprobs.grad[0, 2] == 0  # masked: no gradient at all
    torch.testing.assert_close(out.metrics["is_ratio_mean"], torch.tensor((E + 1 + 3 + 1) / 5))
    torch.testing.assert_close(out.metrics["is_ratio_capped_frac"], torch.tensor(1 / 5))
    torch.testing.assert_close(out.metrics["is_ratio_masked_frac"], torch.tensor(1 / 5))


def test_degenerate_rows_stay_finite():
    mask = torch.tensor([[False] * 4, [True] * 4])
    old, mu = torch.zeros(2, 4), torch.full((2, 4), -30.0)  # ratio e^30: beyond the float clamp
    for rule in ("any", "geometric"):
        w, _ = importance_weights(old, mu, mask, mode="mask", lower=0.5, cap=5.0, sequence_mask=rule)
        assert torch.isfinite(w).all() and w.eq(0).all()  # empty row: no weight; row 1 dropped


def test_bad_bounds_name_the_argument():
    with pytest.raises(ValueError, match="lower must be in \\[0, cap\\)"):
        RolloutCorrection(ClippedPolicyLoss(), lower=3.0, cap=2.0)
    with pytest.raises(ValueError, match="sequence_mask must be"):
        RolloutCorrection(ClippedPolicyLoss(), sequence_mask="all")
    with pytest.raises(ValueError, match="sequence_bounds must be"):
        RolloutCorrection(ClippedPolicyLoss(), sequence_mask="geometric", sequence_bounds=(1.2, 0.8))
