"""The Gaussian step kernel and its three step builders (common/sampling/gaussian_step.py), in float64.

References are written independently here: the step means and stds from the papers' equations in plain Python
floats, densities by ``torch.distributions.Normal`` (not the kernel), and diffusers' own schedulers' ``step`` as a
cross-check of each builder's mean (there at float32 rounding: diffusers keeps its scalars in float32)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler

from common.sampling.gaussian_step import (DDIMStep, FlowSDEStep, LCMStep, gaussian_step_entropy, gaussian_step_kl,
                                           gaussian_step_logprob, seeded_normal)

K, SHAPE = 4, (3, 4, 4)
F32 = 2e-6  # diffusers' float32 ᾱ / sqrt products against our float64 tables (relative, values of O(1))


def hand_density(x_next, mean, std):
    """Mean over dims of log N(x_next; mean, std²) by torch.distributions (independent of the kernel)."""
    return torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next).flatten(1).mean(1)


def rows(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    out = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    xi = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    return x, out, xi


def test_kernel_is_the_mean_of_the_elementwise_gaussian_log_density():
    x, mean, _ = rows(0)
    std = torch.rand(6, 1, 1, 1, dtype=torch.float64) + 0.1
    got = gaussian_step_logprob(x, mean, std)
    by_hand = [sum(-(float(a) - float(m)) ** 2 / (2 * float(s) ** 2) - math.log(float(s)) - 0.5 * math.log(2 * math.pi)
                   for a, m in zip(x[i].flatten(), mean[i].flatten())) / x[i].numel() for i, s in enumerate(std.flatten())]
    torch.testing.assert_close(got, torch.tensor(by_hand, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, hand_density(x, mean, std), rtol=1e-12, atol=1e-12)
    ent = gaussian_step_entropy(std, x)
    torch.testing.assert_close(ent, torch.distributions.Normal(0.0, std.flatten()).entropy())
    with pytest.raises(ValueError, match="x_next"):
        gaussian_step_logprob(x, mean[:, :2], std)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_step_matches_the_paper_and_diffusers(eta):
    """DDIM (arXiv 2010.02502 eq. 12, 16) by hand per step; diffusers' DDIMScheduler.step with the same noise gives
    mean + σ ξ; the builder's log-prob of the sampled step equals the hand density."""
    sched = DDIMScheduler(set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    step = DDIMStep(sched, K, eta=eta)
    ref = DDIMScheduler.from_config(sched.config)
    ref.set_timesteps(K)
    ac = [float(a) for a in sched.alphas_cumprod.double()]
    x, eps, xi = rows(1)
    for k, t in enumerate(ref.timesteps.tolist()):
        kk = torch.full((6,), k)
        mean, std = step.stats(eps, x, kk)
        prev = t - 1000 // K
        a_t, a_p = ac[t], (ac[prev] if prev >= 0 else ac[0])
        s = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        hand_mean = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - s * s) * eps
        torch.testing.assert_close(mean, hand_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(std.flatten(), torch.full((6,), s, dtype=torch.float64), rtol=1e-12, atol=0)
        x_next = mean + std * xi
        theirs = ref.step(eps, t, x, eta=eta, variance_noise=xi).prev_sample
        torch.testing.assert_close(theirs, x_next, rtol=F32, atol=F32)
        torch.testing.assert_close(gaussian_step_logprob(x_next, mean, std),
                                   hand_density(x_next, hand_mean, torch.tensor(s, dtype=torch.float64)), rtol=1e-10, atol=1e-10)
        assert s > 0 and torch.isfinite(gaussian_step_logprob(x_next, mean, std)).all()  # the last step too
    torch.testing.assert_close(step.denoised(eps, x, torch.zeros(6, dtype=torch.long)),
                               (x - math.sqrt(1 - ac[ref.timesteps[0]]) * eps) / math.sqrt(ac[ref.timesteps[0]]))


def test_ddim_clips_x0_like_diffusers_and_refuses_a_deterministic_last_step():
    sched = DDIMScheduler(set_alpha_to_one=False, steps_offset=1, clip_sample=True, clip_sample_range=1.0)
    step, ref = DDIMStep(sched, K), DDIMScheduler.from_config(sched.config)
    ref.set_timesteps(K)
    x, eps, xi = rows(2)
    x = 3 * x  # x̂0 well outside [-1, 1]
    for k, t in enumerate(ref.timesteps.tolist()):
        mean, std = step.stats(eps, x, torch.full((6,), k))
        torch.testing.assert_close(ref.step(eps, t, x, eta=1.0, variance_noise=xi).prev_sample, mean + std * xi,
                                   rtol=F32, atol=F32)
    for bad in (DDIMScheduler(), DDIMScheduler(set_alpha_to_one=False, steps_offset=0)):  # ᾱ_prev = 1, or = ᾱ_0 at t = 0
        with pytest.raises(ValueError, match="set_alpha_to_one=False and steps_offset=1"):
            DDIMStep(bad, K)
    with pytest.raises(ValueError, match="eta must be > 0"):
        DDIMStep(sched, K, eta=0.0)


def test_lcm_step_matches_the_boundary_scalings_and_mvc_zigal_last_step():
    """LCM (arXiv 2310.04378 Alg. 1): denoised = c_out x̂0 + c_skip x; μ = √ᾱ_prev denoised, σ² = 1 − ᾱ_prev;
    the last step re-noises to its own ᾱ (MVC-ZigAL) with a finite log-prob and returns the denoised sample;
    diffusers' LCMScheduler.step gives the same denoised and, before the last step, the same noisy sample."""
    sched = LCMScheduler()
    step = LCMStep(sched, K)
    ref = LCMScheduler.from_config(sched.config)
    ref.set_timesteps(K)
    ts = ref.timesteps.tolist()
    ac = [float(a) for a in sched.alphas_cumprod.double()]
    x, eps, xi = rows(3)
    for k, t in enumerate(ts):
        kk = torch.full((6,), k)
        mean, std = step.stats(eps, x, kk)
        st = 10.0 * t  # timestep_scaling
        c_skip, c_out = 0.25 / (st ** 2 + 0.25), st / math.sqrt(st ** 2 + 0.25)
        a_t = ac[t]
        a_p = ac[ts[k + 1]] if k + 1 < K else a_t
        denoised = c_out * (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t) + c_skip * x
        torch.testing.assert_close(mean, math.sqrt(a_p) * denoised, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(std.flatten(), torch.full((6,), math.sqrt(1 - a_p), dtype=torch.float64), rtol=1e-12, atol=0)
        x_next = mean + std * xi
        lp = gaussian_step_logprob(x_next, mean, std)
        torch.testing.assert_close(lp, hand_density(x_next, math.sqrt(a_p) * denoised,
                                                    torch.tensor(math.sqrt(1 - a_p), dtype=torch.float64)), rtol=1e-10, atol=1e-10)
        assert torch.isfinite(lp).all() and float(std.min()) > 0
        g = torch.Generator().manual_seed(k)
        prev_sample, theirs_denoised = ref.step(eps, t, x, generator=g, return_dict=False)
        torch.testing.assert_close(theirs_denoised, step.denoised(eps, x, kk), rtol=F32, atol=F32)
        if k < K - 1:
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
            torch.testing.assert_close(prev_sample, mean + std * noise, rtol=F32, atol=F32)
        else:  # diffusers returns the denoised sample; the RL step is noisy, and its output() is that denoised
            torch.testing.assert_close(step.output(eps, x, kk, x_next), theirs_denoised, rtol=F32, atol=F32)


def test_flow_sde_step_matches_flow_grpo_and_reduces_to_diffusers_euler():
    """Flow-GRPO (arXiv 2505.05470 eq. 9-10; sd3_sde_with_logprob.py) by hand, σ = 1 replaced by the second sigma in
    the std's denominator; with a → 0 the mean is diffusers' FlowMatchEulerDiscreteScheduler (ODE) step."""
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    a = 0.7
    step = FlowSDEStep(sched, K, noise_level=a)
    ref = FlowMatchEulerDiscreteScheduler.from_config(sched.config)
    ref.set_timesteps(K)
    sig = [float(s) for s in ref.sigmas.double()]
    x, v, xi = rows(4)
    for k in range(K):
        kk = torch.full((6,), k)
        mean, std = step.stats(v, x, kk)
        s, s_next = sig[k], sig[k + 1]
        dt = s_next - s
        sd = a * math.sqrt(s / (1 - (sig[1] if s == 1 else s)))
        hand_mean = x * (1 + sd ** 2 / (2 * s) * dt) + v * (1 + sd ** 2 * (1 - s) / (2 * s)) * dt
        hand_std = sd * math.sqrt(-dt)
        torch.testing.assert_close(mean, hand_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(std.flatten(), torch.full((6,), hand_std, dtype=torch.float64), rtol=1e-12, atol=0)
        x_next = mean + std * xi
        lp = gaussian_step_logprob(x_next, mean, std)
        torch.testing.assert_close(lp, hand_density(x_next, hand_mean, torch.tensor(hand_std, dtype=torch.float64)),
                                   rtol=1e-10, atol=1e-10)
        assert torch.isfinite(lp).all() and hand_std > 0  # the last step (σ -> 0) included
        tiny = FlowSDEStep(sched, K, noise_level=1e-9).stats(v, x, kk)[0]
        ref._step_index = k
        torch.testing.assert_close(ref.step(v, ref.timesteps[k], x).prev_sample, tiny, rtol=F32, atol=F32)
        torch.testing.assert_close(step.ode_step(v, x, kk), x + v * dt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step.model_timesteps, torch.tensor(sig[:-1], dtype=torch.float64) * 1000)


def test_builders_are_vectorised_over_rows_at_different_steps():
    x, out, _ = rows(5, n=K)
    kk = torch.arange(K)
    for step in (DDIMStep(DDIMScheduler(set_alpha_to_one=False, steps_offset=1), K), LCMStep(LCMScheduler(), K),
                 FlowSDEStep(FlowMatchEulerDiscreteScheduler(), K)):
        mean, std = step.stats(out, x, kk)
        for k in range(K):
            m1, s1 = step.stats(out[k:k + 1], x[k:k + 1], kk[k:k + 1])
            torch.testing.assert_close(mean[k:k + 1], m1, rtol=0, atol=0)
            torch.testing.assert_close(std[k:k + 1], s1, rtol=0, atol=0)


def test_closed_form_kl_matches_hand_value_and_monte_carlo(one_thread):
    """KL(N(μp, σp²) ‖ N(μq, σq²)) per element, mean over dims: by hand for scalars, and Monte-Carlo over 2e5 draws
    (|error| ≤ 5 standard errors); between two DDIM step distributions with the same σ it is mean (Δμ)²/(2σ²)."""
    mp, sp, mq, sq = 0.3, 0.5, -0.2, 0.8
    hand = math.log(sq / sp) + (sp ** 2 + (mp - mq) ** 2) / (2 * sq ** 2) - 0.5
    got = gaussian_step_kl(torch.full((1, 3), mp, dtype=torch.float64), torch.tensor(sp, dtype=torch.float64),
                           torch.full((1, 3), mq, dtype=torch.float64), torch.tensor(sq, dtype=torch.float64))
    assert abs(float(got) - hand) < 1e-14
    g = torch.Generator().manual_seed(0)
    mean_p, mean_q = torch.randn(2, 8, generator=g, dtype=torch.float64), torch.randn(2, 8, generator=g, dtype=torch.float64)
    std_p = torch.tensor([[0.4], [1.3]], dtype=torch.float64)
    std_q = torch.tensor([[0.9], [0.7]], dtype=torch.float64)
    n = 200_000
    draws = mean_p + std_p * torch.randn(n, 2, 8, generator=g, dtype=torch.float64)  # (n, 2, 8)
    p, q = torch.distributions.Normal(mean_p, std_p), torch.distributions.Normal(mean_q, std_q)
    terms = (p.log_prob(draws) - q.log_prob(draws)).mean(-1)  # (n, 2)
    mc, se = terms.mean(0), terms.std(0) / math.sqrt(n)
    kl = gaussian_step_kl(mean_p, std_p, mean_q, std_q)
    assert ((kl - mc).abs() <= 5 * se).all(), (kl, mc, se)
    step = DDIMStep(DDIMScheduler(set_alpha_to_one=False, steps_offset=1), K)
    x, e1, e2 = rows(6)
    kk = torch.full((6,), 1)
    (m1, s1), (m2, s2) = step.stats(e1, x, kk), step.stats(e2, x, kk)
    torch.testing.assert_close(gaussian_step_kl(m1, s1, m2, s2), ((m1 - m2) ** 2 / (2 * s1 ** 2)).flatten(1).mean(1))


def test_seeded_normal_is_per_row_and_standard():
    seeds = torch.tensor([3, 11, 2**40 + 7])
    z = seeded_normal(seeds, 5, (4000,), torch.float64)
    torch.testing.assert_close(seeded_normal(seeds[1:2], 5, (4000,), torch.float64), z[1:2], rtol=0, atol=0)
    assert not torch.equal(seeded_normal(seeds, 6, (4000,), torch.float64), z)
    # 12000 draws: mean within 5 standard errors of 0, variance within 5 of 1 (var of s² ≈ 2/n)
    assert abs(float(z.mean())) < 5 / math.sqrt(z.numel()) and abs(float(z.var()) - 1) < 5 * math.sqrt(2 / z.numel())


# ------------------------------------------------------------------ flow SDE vs ODE marginals on a 2-D Gaussian mixture
# p0 = Σ_i w_i N(m_i, s_i² I); x_σ = (1 − σ) x0 + σ ε has the marginal Σ_i w_i N((1 − σ) m_i, τ_i² I) with
# τ_i² = (1 − σ)² s_i² + σ², and the exact velocity v(x, σ) = E[ε − x0 | x_σ = x] is the posterior-weighted mix of
# the components' Gaussian conditionals E[ε | x, i] = σ (x − (1 − σ) m_i)/τ_i²,
# E[x0 | x, i] = m_i + (1 − σ) s_i² (x − (1 − σ) m_i)/τ_i².
GMM_W = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
GMM_M = torch.tensor([[-1.5, 0.0], [1.5, 1.0], [0.5, -1.5]], dtype=torch.float64)
GMM_S = torch.tensor([0.4, 0.3, 0.5], dtype=torch.float64)


def gmm_marginal(sig: float):
    return (1 - sig) * GMM_M, (1 - sig) ** 2 * GMM_S ** 2 + sig ** 2  # (3, 2), (3,)


def gmm_velocity(x, sig: float):  # (N, 2) -> (N, 2)
    mu, tau2 = gmm_marginal(sig)
    d = x[:, None] - mu[None]  # (N, 3, 2)
    w = torch.softmax(GMM_W.log() - d.pow(2).sum(-1) / (2 * tau2) - tau2.log(), 1)  # (N, 3) posterior (2-D density)
    e_eps = sig / tau2[None, :, None] * d
    e_x0 = GMM_M[None] + ((1 - sig) * GMM_S ** 2 / tau2)[None, :, None] * d
    return (w[..., None] * (e_eps - e_x0)).sum(1)


def gmm_sample(n: int, sig: float, g):
    c = torch.multinomial(GMM_W, n, replacement=True, generator=g)
    mu, tau2 = gmm_marginal(sig)
    return mu[c] + tau2[c].sqrt()[:, None] * torch.randn(n, 2, generator=g, dtype=torch.float64)


def gmm_moments(sig: float):
    mu, tau2 = gmm_marginal(sig)
    mean = (GMM_W[:, None] * mu).sum(0)
    second = (GMM_W[:, None, None] * (tau2[:, None, None] * torch.eye(2, dtype=torch.float64)
                                      + mu[:, :, None] * mu[:, None, :])).sum(0)
    return mean, second - mean[:, None] * mean[None]


def stat_terms(z, centre):
    """Per-sample terms whose means are the mean (2) and the covariance entries (3) around ``centre``. (N, 5)."""
    d = z - centre
    return torch.cat([z, d[:, :1] ** 2, d[:, 1:] ** 2, d[:, :1] * d[:, 1:]], 1)


def mmd_blocks(x, y, block: int = 100, bandwidths=(0.3, 1.0)):
    """Block MMD² (Zaremba, Gretton & Blaschko 2013, the B-test): the unbiased quadratic-time MMD² (Gretton et al.
    2012, JMLR 13, eq. 3) on disjoint blocks of ``block`` pairs with a sum of RBF kernels; the blocks are i.i.d. with
    mean MMD² (0 when the distributions agree), so the standard error is std(blocks)/√(#blocks).
    Returns (estimate, standard error)."""
    n = x.shape[0] // block * block
    xb, yb = x[:n].view(-1, block, x.shape[1]), y[:n].view(-1, block, y.shape[1])  # (nb, b, 2)

    def k(a, b):
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)  # (nb, b, b)
    off = 1 - torch.eye(block, dtype=x.dtype)
    within = ((k(xb, xb) + k(yb, yb)) * off).sum((1, 2)) / (block * (block - 1))
    cross = k(xb, yb) * off  # the unbiased statistic pairs x_i with y_j for i != j
    h = within - 2 * cross.sum((1, 2)) / (block * (block - 1))  # (nb,)
    return h.mean(), h.std() / math.sqrt(h.numel())


Z_MAX = 5.0  # two-sided normal tail 5.7e-7 per comparison; x ~1000 comparisons per run -> < 1e-3 false alarms (Bonferroni)


def run_chains(step, n, g, sde_step=None):
    """ODE and SDE chains from independent draws of the exact marginal at σ_0; yields (σ_next, sde, ode) per step."""
    sig = step.sigma.tolist() + [0.0]
    x, y = gmm_sample(n, sig[0], g), gmm_sample(n, sig[0], g)
    for k in range(step.num_steps):
        kk = torch.full((n,), k)
        if sde_step is None:
            mean, std = step.stats(gmm_velocity(x, sig[k]), x, kk)
            x = mean + std * torch.randn(n, 2, generator=g, dtype=torch.float64)
        else:
            x = sde_step(x, sig[k], sig[k + 1], g)
        y = step.ode_step(gmm_velocity(y, sig[k]), y, kk)
        yield sig[k + 1], x, y


def worst_z(step, n, seed, sde_step=None):
    """Largest |z| over every step of: SDE vs ODE (means, covariances, MMD), SDE and ODE vs the exact moments."""
    g = torch.Generator().manual_seed(seed)
    worst = {"sde-ode": 0.0, "mmd": 0.0, "sde-exact": 0.0, "ode-exact": 0.0}
    for s_next, x, y in run_chains(step, n, g, sde_step):
        mean, cov = gmm_moments(s_next)
        exact = torch.cat([mean, cov[0, 0:1], cov[1, 1:2], cov[0, 1:2]])
        tx, ty = stat_terms(x, mean), stat_terms(y, mean)  # centred on the exact mean: the covariance terms are unbiased
        ex, ey = tx.mean(0), ty.mean(0)
        sx, sy = tx.std(0) / math.sqrt(n), ty.std(0) / math.sqrt(n)
        worst["sde-ode"] = max(worst["sde-ode"], float(((ex - ey).abs() / (sx ** 2 + sy ** 2).sqrt()).max()))
        worst["sde-exact"] = max(worst["sde-exact"], float(((ex - exact).abs() / sx).max()))
        worst["ode-exact"] = max(worst["ode-exact"], float(((ey - exact).abs() / sy).max()))
        mmd, se = mmd_blocks(x, y)
        worst["mmd"] = max(worst["mmd"], float(mmd.abs() / se))
    return worst


def test_flow_sde_marginals_equal_the_ode_marginals_on_a_gaussian_mixture(one_thread):
    """Flow-GRPO's SDE keeps the probability-flow ODE's marginals (its drift carries the score correction): with the
    exact velocity of a 2-D Gaussian mixture, at every one of 60 steps (σ 0.9 -> 0, 6000 samples each) the SDE and
    the ODE agree in mean, covariance and block MMD, and both agree with the analytic marginal, all within
    Z_MAX standard errors (measured worst |z| 2.2-2.9 over seeds 0-3). The same checks reject an SDE without the
    score-correction drift (power; on a 20-step schedule to keep the test short)."""
    step = FlowSDEStep(sigmas=torch.linspace(0.9, 0.0, 61).tolist(), noise_level=0.7)
    worst = worst_z(step, 6000, seed=0)
    assert max(worst.values()) < Z_MAX, worst

    def no_correction(x, s, s_next, g):  # dx = v dσ + s dw: the right noise, the wrong drift
        sd = 0.7 * math.sqrt(s / (1 - s)) * math.sqrt(s - s_next)
        return x + gmm_velocity(x, s) * (s_next - s) + sd * torch.randn(x.shape, generator=g, dtype=torch.float64)

    coarse = FlowSDEStep(sigmas=torch.linspace(0.9, 0.0, 21).tolist(), noise_level=0.7)
    wrong = worst_z(coarse, 6000, seed=0, sde_step=no_correction)
    assert wrong["sde-ode"] > 3 * Z_MAX and wrong["mmd"] > Z_MAX and wrong["sde-exact"] > 3 * Z_MAX, wrong


def test_flow_grpo_first_step_from_sigma_one_inflates_the_variance_by_a4_over_4(one_thread):
    """Documented deviation of Flow-GRPO's schedule: from σ = 1 (σ' -> the second sigma in the std's denominator)
    the first step has noise variance a² and drift factor 1 − a²/2 for any K, so the marginal variance after it is
    (1 − a²/2)² + a² = 1 + a⁴/4 (+ O(dt)) instead of the exact ≈ 1 − O(dt). Measured on the mixture, K = 200."""
    a, n = 0.7, 20000
    step = FlowSDEStep(sigmas=torch.linspace(1.0, 0.0, 201).tolist(), noise_level=a)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    mean, std = step.stats(gmm_velocity(x, 1.0), x, torch.zeros(n, dtype=torch.long))
    x1 = mean + std * torch.randn(n, 2, generator=g, dtype=torch.float64)
    _, cov = gmm_moments(float(step.sigma[1]))
    excess = x1.var(0) - cov.diagonal()  # (2,)
    se = math.sqrt(2 * 1.05 ** 2 / n)  # sd of a sample variance ≈ σ² √(2/n)
    dt = 1 / 200
    assert ((excess - a ** 4 / 4).abs() <= Z_MAX * se + dt).all(), (excess, a ** 4 / 4, se)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_other_prediction_types_match_diffusers(prediction_type):
    """x0- and v-prediction models: the DDIM builder's sample equals DDIMScheduler.step's with the same noise, the LCM
    builder's denoised equals LCMScheduler.step's (float32 scalars in diffusers)."""
    x, out, xi = rows(7)
    ddim = DDIMScheduler(set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type=prediction_type)
    lcm = LCMScheduler(prediction_type=prediction_type)
    sd, sl = DDIMStep(ddim, K), LCMStep(lcm, K)
    rd, rl = DDIMScheduler.from_config(ddim.config), LCMScheduler.from_config(lcm.config)
    rd.set_timesteps(K)
    rl.set_timesteps(K)
    for k in range(K):
        kk = torch.full((6,), k)
        mean, std = sd.stats(out, x, kk)
        a = float(sd.alpha_t[k])  # diffusers' float32 scalars err ~1e-7 relative on terms as large as |ε̂| (~300 at t = 1)
        tol = F32 * max(1.0, float(((x - a ** 0.5 * out) / (1 - a) ** 0.5).abs().max())) if prediction_type == "sample" else F32
        torch.testing.assert_close(rd.step(out, rd.timesteps[k], x, eta=1.0, variance_noise=xi).prev_sample,
                                   mean + std * xi, rtol=F32, atol=tol)
        theirs = rl.step(out, rl.timesteps[k], x, generator=torch.Generator().manual_seed(0), return_dict=False)[1]
        torch.testing.assert_close(theirs, sl.denoised(out, x, kk), rtol=F32, atol=F32)
