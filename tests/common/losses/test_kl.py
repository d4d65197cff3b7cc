"""Per-token KL estimators (common/losses/kl.py): hand values, k3 >= 0, zero at equality, the clamp, and
unbiasedness (the p-weighted sum over a full categorical equals the exact KL)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.losses.kl import kl_estimate

LN2 = math.log(2.0)

# ---------------------------------------------------------------------------------------------- helpers


def kl_at(delta: float, estimator: str, dtype=torch.float64) -> float:
    """Estimator at δ = ref − logp, with logp = 0."""
    return kl_estimate(torch.zeros(1, 1, dtype=dtype), torch.full((1, 1), delta, dtype=dtype), estimator).item()


# ------------------------------------------------------------------------------------------ hand values


@pytest.mark.parametrize(
    "delta, k1, k2, k3",
    [
        (LN2, -LN2, LN2**2 / 2, 2 - LN2 - 1),  # logp = 0, ref = ln 2: k3 = e^ln2 − ln2 − 1 = 0.30685
        (-LN2, LN2, LN2**2 / 2, 0.5 + LN2 - 1),  # ref = −ln 2: k3 = 1/2 + ln2 − 1 = 0.19315
        (1.0, -1.0, 0.5, math.e - 2),  # k3 = e − 1 − 1 = 0.71828
        (-3.0, 3.0, 4.5, math.exp(-3) + 2),  # k3 = e^−3 + 3 − 1 = 2.04979
    ],
)
def test_hand_values(delta: float, k1: float, k2: float, k3: float) -> None:
    assert kl_at(delta, "k1") == pytest.approx(k1, abs=1e-12)
    assert kl_at(delta, "k2") == pytest.approx(k2, abs=1e-12)
    assert kl_at(delta, "k3") == pytest.approx(k3, abs=1e-12)


def test_hand_values_on_a_batch_use_delta_ref_minus_logp() -> None:
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]], dtype=torch.float64)
    ref = logp + torch.tensor([[LN2, 0.0], [-LN2, 1.0]], dtype=torch.float64)
    expected = torch.tensor([[1 - LN2, 0.0], [LN2 - 0.5, math.e - 2]], dtype=torch.float64)  # e^δ − δ − 1
    torch.testing.assert_close(kl_estimate(logp, ref), expected, rtol=0, atol=1e-12)  # k3 is the default


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_zero_when_equal(estimator: str) -> None:
    logp = torch.tensor([[-0.1, -3.0, -20.0]])
    assert kl_estimate(logp, logp.clone(), estimator).tolist() == [[0.0, 0.0, 0.0]]


def test_k3_gradient_hand_computed() -> None:
    # d k3 / d logp = d/dlogp (e^δ − δ − 1) with δ = ref − logp -> −(e^δ − 1) = 1 − e^δ
    # at δ = ln 2: 1 − 2 = −1
    logp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    kl_estimate(logp, torch.full((1, 1), LN2, dtype=torch.float64)).sum().backward()
    assert logp.grad.item() == pytest.approx(-1.0, abs=1e-12)


# ------------------------------------------------------------------------------------------ properties


@settings(max_examples=50, deadline=None)
@given(delta=st.floats(-30, 30, allow_nan=False), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_k3_is_non_negative(delta: float, dtype) -> None:
    assert kl_at(delta, "k3", dtype) >= 0.0


def test_k3_is_non_negative_near_zero_float32() -> None:
    # e^δ − δ − 1 ≈ δ²/2 cancels catastrophically in float32 for |δ| ~ 1e-4: rounding must not make it < 0
    delta = torch.linspace(-1e-3, 1e-3, 20001)  # (N,) float32
    k3 = kl_estimate(torch.zeros(1, delta.numel()), delta[None, :], "k3")
    assert k3.min().item() >= 0.0


@settings(max_examples=50, deadline=None)
@given(delta=st.floats(-1e4, 1e4, allow_nan=False), estimator=st.sampled_from(["k1", "k2", "k3"]))
def test_values_are_finite_and_within_the_clamp(delta: float, estimator: str) -> None:
    value = kl_at(delta, estimator, torch.float32)
    assert math.isfinite(value) and -10.0 <= value <= 10.0


@pytest.mark.parametrize(
    "delta, estimator, expected",
    [
        (20.0, "k1", -10.0),  # δ clamped to 10 -> −10
        (-20.0, "k1", 10.0),
        (20.0, "k2", 10.0),  # 10²/2 = 50 -> clamped to 10
        (20.0, "k3", 10.0),  # e^10 − 11 ≈ 2.2e4 -> clamped to 10
        (3.0, "k3", 10.0),  # e^3 − 4 = 16.09 -> clamped to 10
        (-20.0, "k3", math.exp(-10) + 9.0),  # δ clamped to −10: e^−10 + 10 − 1 = 9.0000454, under the bound
        (1e6, "k3", 10.0),  # would overflow exp() without the clamp
    ],
)
def test_clamp_bounds_at_large_differences(delta: float, estimator: str, expected: float) -> None:
    assert kl_at(delta, estimator, torch.float32) == pytest.approx(expected, abs=1e-5)


def test_gradient_is_finite_at_huge_differences() -> None:
    logp = torch.tensor([[-1e4, 0.0, -50.0]], requires_grad=True)
    kl_estimate(logp, torch.zeros(1, 3)).sum().backward()
    assert torch.isfinite(logp.grad).all()


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("seed", range(3))
def test_unbiased_estimators_average_to_exact_kl(estimator: str, seed: int) -> None:
    # Σ_x p(x)·k(x) over a full categorical = KL(p ‖ q) for k1 and k3 (Σ p·(q/p − 1) = 0), exactly.
    generator = torch.Generator().manual_seed(seed)
    logp = torch.randn(7, dtype=torch.float64, generator=generator).log_softmax(0)  # (V,) policy
    logq = torch.randn(7, dtype=torch.float64, generator=generator).log_softmax(0)  # (V,) reference
    exact = sum(math.exp(a) * (a - b) for a, b in zip(logp.tolist(), logq.tolist()))  # plain-loop KL(p‖q)
    estimate = (logp.exp() * kl_estimate(logp[None], logq[None], estimator)[0]).sum()
    assert estimate.item() == pytest.approx(exact, abs=1e-12)


# ----------------------------------------------------------------------------------------- bad input


def test_unknown_estimator_raises_listing_choices() -> None:
    with pytest.raises(ValueError, match=r"kl estimator must be 'k1', 'k2' or 'k3', got 'k4'"):
        kl_estimate(torch.zeros(1, 2), torch.zeros(1, 2), "k4")


def test_shape_mismatch_raises_naming_both() -> None:
    with pytest.raises(ValueError, match=r"logprobs \(1, 2\) and ref_logprobs \(1, 3\)"):
        kl_estimate(torch.zeros(1, 2), torch.zeros(1, 3))
