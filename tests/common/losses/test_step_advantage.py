"""Step-level Direct Advantage Policy Optimization loss (Skywork, arXiv 2412.18279): hand values, gradient,
micro-batch invariance, empty steps, bad input; and the regression it defines on a one-state bandit."""

from __future__ import annotations

import pytest
import torch

from common.losses.aggregate import Normaliser
from common.losses.step_advantage import DirectAdvantageLoss, direct_advantage_loss


def two_steps():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.5], [-1.0, 9.0]])
    mask = torch.tensor([[True, True], [True, False]])
    return logprobs, ref, mask, torch.tensor([0.3, -0.5])


def test_hand_computed_value():
    logprobs, ref, mask, adv = two_steps()
    out = DirectAdvantageLoss(beta=0.5)(logprobs, logprobs.detach(), adv, mask, ref_logprobs=ref)
    # step 1: log-ratio (−3) − (−3) = 0, target 0.3/0.5 = 0.6 -> 0.36; step 2 (one token): 0.5 vs −1 -> 2.25
    assert float(out.loss) == pytest.approx((0.36 + 2.25) / 2)
    assert float(out.metrics["log_ratio"]) == pytest.approx(0.25)
    assert float(out.metrics["target"]) == pytest.approx((0.6 - 1.0) / 2)


def test_gradient_is_the_derivative_of_the_squared_error():
    logprobs, ref, mask, adv = two_steps()
    DirectAdvantageLoss(beta=0.5)(logprobs, logprobs.detach(), adv, mask, ref_logprobs=ref).loss.backward()
    # ∂/∂ℓ_it = 2 (log-ratio_i − A_i/β) m_it / N: row 1: 2·(0 − 0.6)/2 = −0.6; row 2: 2·(0.5 + 1)/2 = 1.5, masked 0
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.6, -0.6], [1.5, 0.0]]))


def test_micro_batches_sum_to_the_full_batch_and_empty_steps_count_nothing():
    g = torch.Generator().manual_seed(0)
    lp, ref = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    mask = torch.arange(5)[None, :] < torch.tensor([5, 0, 3, 1, 4, 0])[:, None]
    adv = torch.randn(6, generator=g)
    loss = DirectAdvantageLoss(beta=0.2)
    full = loss(lp, lp, adv, mask, ref_logprobs=ref).loss
    norm = Normaliser.of(mask)
    parts = sum(loss(lp[s], lp[s], adv[s], mask[s], ref_logprobs=ref[s], normaliser=norm).loss
                for s in (slice(0, 2), slice(2, 5), slice(5, 6)))
    torch.testing.assert_close(parts, full)
    # plain-loop reference over the 4 non-empty steps
    expected = sum((float((lp[i] - ref[i])[mask[i]].sum()) - float(adv[i]) / 0.2) ** 2 for i in (0, 2, 3, 4)) / 4
    assert float(full) == pytest.approx(expected, rel=1e-5)
    empty = loss(lp, lp, adv, torch.zeros_like(mask), ref_logprobs=ref)
    assert float(empty.loss) == 0.0 and all(torch.isfinite(v) for v in empty.metrics.values())


def test_minimiser_on_a_one_state_bandit_fits_the_advantage_differences():
    """A free softmax policy over 4 single-token steps, loss weighted by π_ref: the optimum moves the policy
    toward π_ref·exp(A/β), so its log-ratio differences are (A_a − A_b)/β up to the ignored log Z (small here)."""
    ref = torch.log_softmax(torch.tensor([0.5, 0.0, -0.5, 0.2]), 0)
    adv = torch.tensor([0.02, -0.01, 0.03, -0.03])
    adv = adv - (ref.exp() * adv).sum()  # E_{π_ref}[A] = 0
    beta = 0.1
    logits = ref.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([logits], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (ref.exp() * direct_advantage_loss(torch.log_softmax(logits, 0), ref, adv, beta)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    ratio = torch.log_softmax(logits, 0).detach() - ref
    target = adv / beta
    # targets A/β span ±0.3; the ignored log Z is O(E[(A/β)²]) ≈ 0.04, and its uneven share is below 0.02
    torch.testing.assert_close(ratio - ratio.mean(), target - target.mean(), atol=2e-2, rtol=0)
    assert float((ratio - target).std()) < 0.1 * float(target.std())  # the fit explains > 99% of the variance
    better = (torch.softmax(logits, 0) * adv).sum() > (ref.exp() * adv).sum()  # policy improvement
    assert bool(better)


def test_bad_inputs_name_the_argument():
    logprobs, ref, mask, adv = two_steps()
    with pytest.raises(ValueError, match="beta"):
        DirectAdvantageLoss(beta=0.0)
    with pytest.raises(ValueError, match="ref_logprobs"):
        DirectAdvantageLoss()(logprobs, logprobs, adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        DirectAdvantageLoss()(logprobs, logprobs, adv[:, None].expand(2, 2), mask, ref_logprobs=ref)
    with pytest.raises(ValueError, match="must all be"):
        direct_advantage_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), 1.0)
