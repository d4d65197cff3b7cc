"""HölderPO (common/losses/holder.py): power-mean identities, the softmax(pΔ) gradient weights, gradient
concentration in p, the schedules, the sequence-level clip, micro-batch invariance and bad inputs."""

import math

import pytest
import torch

from common.losses.aggregate import Normaliser
from common.losses.holder import SCHEDULES, HolderPolicyLoss, holder_mean_ratio, holder_p


def random_delta(seed: int, B: int = 5, T: int = 7, spread: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    delta = spread * torch.randn(B, T, dtype=torch.float64, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    return delta, torch.arange(T)[None, :] < lengths[:, None]


def naive_holder(delta, mask, p):
    """Plain loop: ((1/L) Σ ρ^p)^(1/p), or exp(mean Δ) at p = 0."""
    out = []
    for d, m in zip(delta, mask):
        rho = torch.exp(d[m])
        out.append(torch.exp(torch.log(rho).mean()) if p == 0 else (rho**p).mean() ** (1 / p))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------ identities


def test_hand_values_two_tokens() -> None:
    # ρ = (1, 4): p=1 arithmetic (1+4)/2 = 2.5; p=0 geometric sqrt(4) = 2; p=−1 harmonic 2/(1 + 1/4) = 1.6;
    # p=2 quadratic sqrt((1 + 16)/2) = 2.9155
    delta = torch.tensor([[0.0, math.log(4.0)]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    for p, want in ((1, 2.5), (0, 2.0), (-1, 1.6), (2, math.sqrt(8.5))):
        assert holder_mean_ratio(delta, mask, p).item() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("p", [-2.0, -1.0, -0.3, 0.0, 0.5, 1.0, 2.0, 5.0])
def test_matches_naive_loop(seed, p) -> None:
    delta, mask = random_delta(seed)
    torch.testing.assert_close(holder_mean_ratio(delta, mask, p), naive_holder(delta, mask, p), rtol=1e-10, atol=1e-12)


def test_continuous_at_zero_and_monotone_in_p() -> None:
    delta, mask = random_delta(7)
    geo = holder_mean_ratio(delta, mask, 0.0)
    for p in (1e-6, -1e-6, 1e-5, -1e-5, 1e-3):
        torch.testing.assert_close(holder_mean_ratio(delta, mask, p), geo, rtol=2e-3 * max(abs(p) / 1e-3, 1e-3), atol=0)
    ps = torch.linspace(-3, 3, 61).tolist()
    values = torch.stack([holder_mean_ratio(delta, mask, p) for p in ps])  # (P, B) power-mean inequality
    assert bool((values[1:] >= values[:-1] - 1e-12).all())


def test_empty_row_is_one_and_extreme_ratios_finite() -> None:
    delta = torch.tensor([[100.0, -100.0], [0.3, 0.0]], dtype=torch.float32)
    mask = torch.tensor([[True, True], [False, False]])
    for p in (-2.0, 0.0, 2.0, 50.0):
        R = holder_mean_ratio(delta, mask, p)
        assert torch.isfinite(R).all() and R[1].item() == 1.0


# ------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("p", [-2.0, -0.5, 0.0, 1.0, 2.0])
def test_gradient_is_R_times_softmax_of_p_delta(p) -> None:
    # ∂R_i/∂Δ_it = R_i · softmax_t(pΔ_i)_t over the valid tokens (p = 0: uniform 1/L_i)
    delta, mask = random_delta(3)
    delta.requires_grad_(True)
    R = holder_mean_ratio(delta, mask, p)
    R.sum().backward()
    weights = torch.softmax((p * delta.detach()).masked_fill(~mask, -torch.inf), dim=1)
    torch.testing.assert_close(delta.grad, R.detach()[:, None] * weights, rtol=1e-10, atol=1e-12)


def test_gradient_concentration_grows_with_p() -> None:
    delta, mask = random_delta(11, B=1, T=8, spread=0.8)
    mask[:] = True
    ps = [i / 10 for i in range(-20, 21)]
    rows = []
    for p in ps:  # token weights from autograd: ∂R/∂Δ_t / R
        d = delta.clone().requires_grad_(True)
        R = holder_mean_ratio(d, mask, p)
        R.sum().backward()
        rows.append(d.grad[0] / R.detach()[0])
    w = torch.stack(rows)  # (P, T)
    top = w[:, delta[0].argmax()]
    assert bool((top[1:] >= top[:-1] - 1e-12).all())  # d log w_max / dp = Δ_max − E_w[Δ] >= 0
    entropy = -(w * w.log()).sum(1)
    assert int(entropy.argmax()) == ps.index(0.0)  # uniform weights at p = 0
    positive = entropy[ps.index(0.0):]
    assert bool((positive[1:] <= positive[:-1] + 1e-12).all())


def test_on_policy_every_p_gives_the_same_gradient() -> None:
    # at ρ ≡ 1 the weights are uniform for every p, so the loss gradient does not depend on p
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, dtype=torch.float64, generator=g)
    mask = torch.ones(4, 6, dtype=torch.bool)
    A = torch.randn(4, dtype=torch.float64, generator=g)
    grads = []
    for p in (-2.0, 0.0, 2.0):
        lp = old.clone().requires_grad_(True)
        loss = HolderPolicyLoss(p_max=p, p_min=p, schedule="constant")
        loss(lp, old, A, mask).loss.backward()
        grads.append(lp.grad)
    torch.testing.assert_close(grads[0], grads[1]) and torch.testing.assert_close(grads[1], grads[2])
    # and equals −A_i / (L_i B): d(−A R)/dℓ_t = −A·(1/L) at R = 1, then / B sequences
    torch.testing.assert_close(grads[0], (-A[:, None] / 6 / 4).expand(4, 6))


# ------------------------------------------------------------------------------------------ schedule


def test_linear_dec_schedule_values() -> None:
    # p(s) = 2 − 4·min(1, s/500): s=0 → 2, s=250 → 0, s=500 → −2, s=900 → −2
    loss = HolderPolicyLoss()
    for step, want in ((0, 2.0), (125, 1.0), (250, 0.0), (500, -2.0), (900, -2.0)):
        loss.set_step(step)
        assert loss.p == pytest.approx(want, abs=1e-12)


def test_every_schedule_ends_at_its_endpoints() -> None:
    starts = {"linear_dec": 2, "linear": -2, "sin": -2, "cos": 2, "quad": -2, "quad_dec": 2, "cubic": -2,
              "cubic_dec": 2, "constant": 2}
    for name in SCHEDULES:
        p0, p1 = holder_p(0, schedule=name), holder_p(500, schedule=name)
        assert p0 == pytest.approx(starts[name], abs=1e-12)
        assert p1 == pytest.approx(starts[name] if name == "constant" else -starts[name], abs=1e-12)


# ------------------------------------------------------------------------------------------ the loss


def test_sequence_clip_hand_case() -> None:
    # one sequence, two tokens with Δ = (0, log 4), p = 1: R = 2.5 > 1.2; A = +1 → loss −1.2, clipped, no grad;
    # A = −1 → loss max(2.5, 1.2) = 2.5, unclipped, gradient dR/dΔ = R·softmax(Δ) = 2.5·(1/5, 4/5) = (0.5, 2)
    old = torch.zeros(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss = HolderPolicyLoss(p_max=1.0, p_min=1.0, schedule="constant")
    lp = torch.tensor([[0.0, math.log(4.0)]], dtype=torch.float64, requires_grad=True)
    out = loss(lp, old, torch.tensor([1.0], dtype=torch.float64), mask)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-1.2) and out.metrics["clip_frac"].item() == 1.0
    assert lp.grad.abs().sum().item() == 0.0
    lp.grad = None
    out = loss(lp, old, torch.tensor([-1.0], dtype=torch.float64), mask)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(2.5)
    torch.testing.assert_close(lp.grad, torch.tensor([[0.5, 2.0]], dtype=torch.float64))


@pytest.mark.parametrize("sizes", [[3, 3], [1, 2, 3], [6]])
def test_micro_batch_invariance(sizes) -> None:
    g = torch.Generator().manual_seed(5)
    old = -torch.rand(6, 5, dtype=torch.float64, generator=g)
    lp0 = old + 0.3 * torch.randn(6, 5, dtype=torch.float64, generator=g)
    mask = torch.arange(5)[None, :] < torch.tensor([5, 3, 0, 1, 4, 2])[:, None]
    A = torch.randn(6, dtype=torch.float64, generator=g)
    loss = HolderPolicyLoss(p_max=1.5, p_min=1.5, schedule="constant")
    full_lp = lp0.clone().requires_grad_(True)
    full = loss(full_lp, old, A, mask)
    full.loss.backward()
    norm = Normaliser.of(mask)
    lp = lp0.clone().requires_grad_(True)
    total, metrics, start = 0.0, {}, 0
    for n in sizes:
        sl = slice(start, start + n)
        out = loss(lp[sl], old[sl], A[sl], mask[sl], normaliser=norm)
        out.loss.backward()
        total = total + out.loss.detach()
        for k, v in out.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v
        start += n
    torch.testing.assert_close(total, full.loss.detach())
    torch.testing.assert_close(lp.grad, full_lp.grad)
    for k in full.metrics:
        torch.testing.assert_close(metrics[k], full.metrics[k])
    assert metrics["holder_p"].item() == pytest.approx(1.5)


def test_bad_inputs_name_the_argument() -> None:
    for kwargs, word in (({"schedule": "exp"}, "schedule"), ({"total_steps": 0}, "total_steps"),
                         ({"eps": 1.5}, "eps"), ({"p_min": 3.0}, "p_min")):
        with pytest.raises(ValueError, match=word):
            HolderPolicyLoss(**kwargs)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="advantages"):
        HolderPolicyLoss()(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), mask)
    with pytest.raises(ValueError, match="mask"):
        holder_mean_ratio(torch.zeros(2, 3), torch.ones(2, 3), 1.0)
    with pytest.raises(ValueError, match="p must"):
        holder_mean_ratio(torch.zeros(2, 3), mask, math.nan)
