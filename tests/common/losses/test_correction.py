"""TIS / MIS importance weights between the trainer's and the sampler's log-probs (common/losses/correction.py)."""

from __future__ import annotations

import math

import pytest
import torch

from common.batch import RolloutBatch
from common.losses.correction import RolloutCorrection, importance_weights
from common.losses.ppo_clip import ClippedPolicyLoss

E = math.e

# Row 0: log w = old − μ = [0 − (−1), −1 − (−1), −2 − 0] = [1, 0, −2] -> w = [e, 1, e^-2]
# Row 1: log w = [ln 3, 0, pad]; its sum is ln 3 (sequence weight 3)
OLD = torch.tensor([[0.0, -1.0, -2.0], [math.log(3.0) - 1.0, -0.5, 0.0]])
MU = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, -0.5, 0.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])


def test_token_truncate_and_mask_by_hand():
    w, capped = importance_weights(OLD, MU, MASK, level="token", mode="truncate", cap=2.0)
    # row 0: min([e, 1, e^-2], 2) = [2, 1, 0.1353]; row 1: min([3, 1], 2) = [2, 1], pad 0
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, E**-2], [2.0, 1.0, 0.0]]))
    assert capped.tolist() == [[True, False, False], [True, False, False]]
    w, _ = importance_weights(OLD, MU, MASK, level="token", mode="mask", cap=2.0)
    # above the cap -> 0: row 0 [0, 1, e^-2], row 1 [0, 1]
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0, E**-2], [0.0, 1.0, 0.0]]))


def test_sequence_level_by_hand():
    # row 0: Σ log w = 1 + 0 − 2 = −1 -> e^-1 = 0.3679 on every token (below the cap: kept by both modes)
    # row 1: Σ log w = ln 3 + 0 = ln 3 -> 3 > 2: truncate -> 2, mask -> 0
    w, capped = importance_weights(OLD, MU, MASK, level="sequence", mode="truncate", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[E**-1] * 3, [2.0, 2.0, 0.0]]))
    assert capped.tolist() == [[False, False, False], [True, True, False]]
    w, _ = importance_weights(OLD, MU, MASK, level="sequence", mode="mask", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[E**-1] * 3, [0.0, 0.0, 0.0]]))


def _batch(mu: torch.Tensor, mask: torch.Tensor) -> RolloutBatch:
    B, T = mask.shape
    return RolloutBatch(prompt_ids=torch.ones(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
                        completion_ids=torch.ones(B, T, dtype=torch.long), completion_mask=mask,
                        group_ids=torch.zeros(B, dtype=torch.long), behaviour_logprobs=mu)


def test_wrapped_loss_and_gradient_are_the_weighted_surrogate():
    """With π = π_old (ratio 1, nothing clipped) the GRPO token-mean loss is −Σ A·w̃ / N and its gradient with
    respect to each token's log-prob is −A·w̃ / N (d/dℓ of −A·exp(ℓ − ℓ_old) at ℓ = ℓ_old)."""
    loss_fn = RolloutCorrection(ClippedPolicyLoss(aggregation="token_mean"), level="token", mode="truncate", cap=2.0)
    logprobs = OLD.clone().requires_grad_(True)
    A = torch.tensor([1.0, -2.0])
    out = loss_fn(logprobs, OLD, A, MASK, batch=_batch(MU, MASK))
    # w̃ = [[2, 1, e^-2], [2, 1, -]], N = 5 tokens:
    # loss = −(1·(2 + 1 + e^-2) + (−2)·(2 + 1)) / 5 = −(3.1353 − 6) / 5 = 0.57293
    expected = -((2 + 1 + E**-2) - 2 * (2 + 1)) / 5
    torch.testing.assert_close(out.loss, torch.tensor(expected))
    out.loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-2 / 5, -1 / 5, -(E**-2) / 5], [4 / 5, 2 / 5, 0.0]]))
    # the metrics: mean w̃ = (2 + 1 + e^-2 + 2 + 1) / 5, capped 2 of 5, mean |ℓ_old − μ| = (1 + 0 + 2 + ln 3 + 0) / 5
    torch.testing.assert_close(out.metrics["is_ratio_mean"], torch.tensor((6 + E**-2) / 5))
    torch.testing.assert_close(out.metrics["is_ratio_capped_frac"], torch.tensor(2 / 5))
    torch.testing.assert_close(out.metrics["is_logp_diff"], torch.tensor((3 + math.log(3.0)) / 5))


def test_no_mismatch_is_the_wrapped_loss():
    inner = ClippedPolicyLoss()
    logprobs = OLD + torch.tensor([[0.3, -0.4, 0.1], [0.05, 0.5, 0.0]])  # some tokens clipped
    A = torch.tensor([0.7, -1.3])
    plain = inner(logprobs, OLD, A, MASK)
    corrected = RolloutCorrection(inner, level="sequence", mode="mask")(logprobs, OLD, A, MASK, batch=_batch(OLD, MASK))
    torch.testing.assert_close(corrected.loss, plain.loss)
    torch.testing.assert_close(corrected.metrics["is_ratio_mean"], torch.tensor(1.0))


def test_empty_completion_and_huge_sequence_mismatch_stay_finite():
    mask = torch.tensor([[False] * 200, [True] * 200])
    old = torch.zeros(2, 200)
    mu = torch.full((2, 200), -5.0)  # Σ log w = 1000: exp would overflow without the clamp
    for mode in ("truncate", "mask"):
        w, _ = importance_weights(old, mu, mask, level="sequence", mode=mode, cap=2.0)
        assert torch.isfinite(w).all()
        assert w[0].eq(0).all()  # no valid token -> no weight
        assert w[1].eq(2.0 if mode == "truncate" else 0.0).all()
    out = RolloutCorrection(ClippedPolicyLoss())(old.clone().requires_grad_(True), old, torch.zeros(2), mask,
                                                 batch=_batch(mu, mask))
    assert torch.isfinite(out.loss)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="behaviour_logprobs"):
        RolloutCorrection(ClippedPolicyLoss())(OLD, OLD, torch.zeros(2), MASK, batch=_batch(None, MASK))
    with pytest.raises(ValueError, match="cap must be > 0"):
        RolloutCorrection(ClippedPolicyLoss(), cap=0.0)
    with pytest.raises(ValueError, match="level must be 'token' or 'sequence'"):
        importance_weights(OLD, MU, MASK, level="batch")
    with pytest.raises(ValueError, match="must all be \\(B, T\\)"):
        importance_weights(OLD, MU[:, :2], MASK)
