"""MVC-ZigAL parts on hand-built tensors: zigzag state, the MV-ZigAL loss against a plain-loop reference, the
Lagrangian's asymmetric steps and bounds by hand, MVCAdvantage's modes."""

from __future__ import annotations

import math

import pytest
import torch

from common.batch import RolloutBatch
from common.losses.aggregate import Normaliser
from common.losses.ppo_clip import ClippedPolicyLoss
from diffusion.multiview.zigal import (LagrangianConstraint, MVCAdvantage, ZigALLoss, ZigzagFirstStep, ddim_invert,
                                       zigal_pair_loss, zigzag_state, zscore)


def test_ddim_invert_inverts_a_deterministic_ddim_step_float64():
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    a_t, a_prev = 0.2, 0.7
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps  # DDIM η = 0 with a fixed ε̂
    torch.testing.assert_close(ddim_invert(x_prev, eps, a_prev, a_t), x_t, rtol=0, atol=1e-12)
    # per-row alphas broadcast over the trailing dims
    out = ddim_invert(x_prev, eps, torch.full((3,), a_prev, dtype=torch.float64), torch.full((3,), a_t, dtype=torch.float64))
    torch.testing.assert_close(out, x_t, rtol=0, atol=1e-12)


def test_zigzag_state_by_hand_keeps_shape_and_guidances():
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(2, 12, 8, 8, generator=g, dtype=torch.float64)
    a_t, a_prev = 0.05, 0.5
    seen = []

    def step(x, omega):  # a deterministic "denoise": x' = 0.5 x + ω
        seen.append(("step", omega))
        return 0.5 * x + omega

    def eps(x, omega):
        seen.append(("eps", omega))
        return 0.1 * x - omega

    zz = ZigzagFirstStep(omega_high=4.0, omega_low=1.0, iterations=1)
    out = zz.state(x_T, step=step, eps=eps, alpha_t=a_t, alpha_prev=a_prev)
    assert out.shape == x_T.shape and seen == [("step", 4.0), ("eps", 1.0)]
    xp = 0.5 * x_T + 4.0
    e = 0.1 * xp - 1.0
    x0 = (xp - math.sqrt(1 - a_prev) * e) / math.sqrt(a_prev)
    torch.testing.assert_close(out, math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * e, rtol=0, atol=1e-12)
    two = zigzag_state(x_T, denoise=lambda x: step(x, 4.0), predict_eps=lambda x: eps(x, 1.0), alpha_t=a_t,
                       alpha_prev=a_prev, iterations=2)
    torch.testing.assert_close(two, zigzag_state(out, denoise=lambda x: step(x, 4.0), predict_eps=lambda x: eps(x, 1.0),
                                                 alpha_t=a_t, alpha_prev=a_prev), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="iterations"):
        ZigzagFirstStep(iterations=0)


def reference_zigal(lp, old, adv, mask, zz, clip, eta):
    """Plain loop over pairs and steps, written from the spec's formula."""
    total, count = 0.0, 0
    B, K = len(lp), len(lp[0])
    for i in range(0, B, 2):
        z, s = (i, i + 1) if zz[i] else (i + 1, i)
        for k in range(K):
            if not (mask[z][k] and mask[s][k]):
                continue
            dz, ds = lp[z][k] - old[z][k], lp[s][k] - old[s][k]
            d = dz - ds
            dc = min(max(dz, -clip), clip) - min(max(ds, -clip), clip)
            a = adv[z] - adv[s]
            total = total + max((d / eta - a) ** 2, (dc / eta - a) ** 2)
            count += 1
    return total / count


@pytest.mark.parametrize("clip,eta", [(1e-4, 1.0), (0.05, 0.5)])
def test_zigal_loss_matches_plain_loop_reference(clip, eta):
    g = torch.Generator().manual_seed(2)
    B, K = 6, 4
    old = torch.randn(B, K, generator=g, dtype=torch.float64)
    lp = (old + 0.1 * torch.randn(B, K, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    zz = torch.tensor([False, True, True, False, False, True])  # Z first in the second pair
    mask = torch.ones(B, K, dtype=torch.bool)
    batch = RolloutBatch(completion_ids=torch.zeros(B, K), completion_mask=mask, group_ids=torch.arange(B) // 2,
                         zigzag=zz)
    out = ZigALLoss(clip_range=clip, eta=eta)(lp, old, adv, mask, batch=batch)
    ref = reference_zigal(lp.detach().tolist(), old.tolist(), adv.tolist(), mask.tolist(), zz.tolist(), clip, eta)
    assert abs(float(out.loss) - ref) < 1e-12
    # gradient against autograd through the plain-loop reference
    (g1,) = torch.autograd.grad(out.loss, lp)
    lp2 = lp.detach().clone().requires_grad_(True)
    ref_t = reference_zigal(lp2, old, adv, mask.tolist(), zz.tolist(), clip, eta)
    (g2,) = torch.autograd.grad(ref_t, lp2)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)


def test_zigal_loss_micro_batches_sum_to_the_whole_and_masked_steps_drop():
    g = torch.Generator().manual_seed(3)
    B, K = 8, 3
    old = torch.randn(B, K, generator=g, dtype=torch.float64)
    lp = old + 0.01 * torch.randn(B, K, generator=g, dtype=torch.float64)
    adv = torch.randn(B, K, generator=g, dtype=torch.float64)  # (B, K) advantages accepted too
    zz = torch.arange(B) % 2 == 1
    mask = torch.ones(B, K, dtype=torch.bool)
    batch = RolloutBatch(completion_ids=torch.zeros(B, K), completion_mask=mask, group_ids=torch.arange(B) // 2, zigzag=zz)
    loss = ZigALLoss(0.02)
    whole = loss(lp, old, adv, mask, batch=batch).loss
    norm = Normaliser.of(mask)
    parts = sum(loss(lp[s:s + 2], old[s:s + 2], adv[s:s + 2], mask[s:s + 2], normaliser=norm,
                     batch=batch.select(torch.arange(s, s + 2))).loss for s in range(0, B, 2))
    assert abs(float(whole - parts)) < 1e-12
    # at θ = θ_old the loss is the mean squared advantage difference
    terms, pm = zigal_pair_loss(old, old, adv, mask, zz)
    a = adv[1::2] - adv[0::2]
    torch.testing.assert_close(terms, a ** 2, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="odd batch"):
        zigal_pair_loss(old[:3], old[:3], adv[:3], mask[:3], zz[:3])


def test_ddpo_clipped_pg_accepts_step_logprobs():
    """The DDPO baseline is the shared ClippedPolicyLoss on (B, K) step log-probs; ratio 1 before an update."""
    g = torch.Generator().manual_seed(4)
    old = torch.randn(4, 5, generator=g)
    adv = torch.randn(4, generator=g)
    mask = torch.ones(4, 5, dtype=torch.bool)
    loss = ClippedPolicyLoss(eps_low=1e-4, eps_high=1e-4, aggregation="token_mean")
    lp = old.clone().requires_grad_(True)
    out = loss(lp, old, adv, mask)
    assert abs(float(out.loss) + float(adv.mean())) < 1e-6 and abs(float(out.metrics["ratio"]) - 1) < 1e-6
    (grad,) = torch.autograd.grad(out.loss, lp)
    torch.testing.assert_close(grad, -adv[:, None].expand(4, 5) / 20, rtol=0, atol=1e-7)


def test_lagrangian_follows_asymmetric_steps_by_hand_and_stays_in_bounds():
    lag = LagrangianConstraint(alpha_up=0.1, alpha_down=0.01, lambda_max=5.0, tau_beta=0.99)
    tau, lam = None, 0.0
    for m in [0.5, 0.4, 0.6, 0.6, -100.0, -100.0, 1e6, 0.3]:
        tau = m if tau is None else 0.99 * tau + 0.01 * m
        step = 0.1 if m < tau else 0.01
        lam = min(max(lam + step * (tau - m), 0.0), 5.0)
        got = lag.dual_step(torch.tensor(m, dtype=torch.float64))
        assert abs(float(lag.tau) - tau) < 1e-9 and abs(float(got) - lam) < 1e-9, (m, float(lag.tau), tau, float(got), lam)
        assert 0.0 <= float(got) <= 5.0
    # by hand, the first three: τ 0.5, 0.499, 0.50001; λ 0, 0.1·0.099, then − 0.01·0.09999
    lag2 = LagrangianConstraint()
    lag2.dual_step(torch.tensor(0.5, dtype=torch.float64))
    assert float(lag2.lam) == 0.0 and float(lag2.tau) == 0.5
    lag2.dual_step(torch.tensor(0.4, dtype=torch.float64))
    assert abs(float(lag2.tau) - 0.499) < 1e-12 and abs(float(lag2.lam) - 0.0099) < 1e-12
    lag2.dual_step(torch.tensor(0.6, dtype=torch.float64))
    assert abs(float(lag2.tau) - 0.50001) < 1e-12 and abs(float(lag2.lam) - (0.0099 - 0.0009999)) < 1e-12
    # hit both bounds: a huge violation clamps at λ_max, a huge surplus at 0
    lag3 = LagrangianConstraint(lambda_max=2.0)
    lag3.dual_step(torch.tensor(1.0))
    assert float(lag3.dual_step(torch.tensor(-1e4))) == 2.0
    assert float(lag3.dual_step(torch.tensor(1e7))) == 0.0
    # λ, τ and the flag are buffers: they round-trip through a state dict
    fresh = LagrangianConstraint()
    fresh.load_state_dict(lag2.state_dict())
    assert float(fresh.lam) == float(lag2.lam) and float(fresh.tau) == float(lag2.tau) and bool(fresh.initialised)
    assert set(lag2.state_dict()) == {"lam", "tau", "initialised", "updates"}
    with pytest.raises(ValueError, match="lambda_init"):
        LagrangianConstraint(lambda_init=6.0)


def scored_batch(r, r_mv):
    B = r.shape[0]
    return RolloutBatch(completion_ids=torch.zeros(B, 2), completion_mask=torch.ones(B, 2, dtype=torch.bool),
                        group_ids=torch.arange(B) // 2, rewards=r + r_mv, reward_components=torch.stack([r, r_mv], 1),
                        reward_names=("alignment", "consistency"))


def test_mvc_advantage_modes_by_hand():
    r = torch.tensor([0.1, 0.3, 0.2, 0.6])
    r_mv = torch.tensor([7.0, 9.0, 8.0, 8.0])
    z = lambda x: (x.double() - x.double().mean()) / x.double().std(unbiased=False)
    m = MVCAdvantage(mode="fixed", constraint=LagrangianConstraint(lambda_init=1.0))
    adv = m.after_score(None, scored_batch(r, r_mv)).advantages
    torch.testing.assert_close(adv, ((z(r) + z(r_mv)) / 2).float())
    assert float(m.constraint.lam) == 1.0 and not bool(m.constraint.initialised)  # fixed: no update
    lit = MVCAdvantage(mode="fixed", normalise_before_combine=False, constraint=LagrangianConstraint(lambda_init=1.0))
    torch.testing.assert_close(lit.after_score(None, scored_batch(r, r_mv)).advantages, z((r + r_mv) / 2).float())
    torch.testing.assert_close(MVCAdvantage(mode="joint").after_score(None, scored_batch(r, r_mv)).advantages, z(r_mv).float())
    torch.testing.assert_close(MVCAdvantage(mode="per_view").after_score(None, scored_batch(r, r_mv)).advantages, z(r).float())
    c = MVCAdvantage(mode="constrained")
    c.after_score(None, scored_batch(r, r_mv))  # first: τ = mean, λ stays 0 -> A = z(R)
    assert float(c.constraint.tau) == 8.0 and float(c.constraint.lam) == 0.0
    adv = c.after_score(None, scored_batch(r, r_mv - 1.0)).advantages  # violated: λ = 0.1·(τ − 7)
    tau = 0.99 * 8.0 + 0.01 * 7.0
    lam = 0.1 * (tau - 7.0)
    torch.testing.assert_close(adv, ((z(r) + lam * z(r_mv)) / (1 + lam)).float())
    # degenerate: all-equal rewards give zero advantages, never NaN
    flat = MVCAdvantage(mode="constrained").after_score(None, scored_batch(torch.ones(4), torch.ones(4))).advantages
    assert torch.equal(flat, torch.zeros(4))
    assert torch.equal(zscore(torch.full((3,), 2.5)), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="fidelity / joint"):
        MVCAdvantage(fidelity="pickscore").after_score(None, scored_batch(r, r_mv))
    with pytest.raises(ValueError, match="mode"):
        MVCAdvantage(mode="both")
