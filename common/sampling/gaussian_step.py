"""One Gaussian step log-prob kernel for diffusion RL, and the step builders that feed it (domains.md §0.4).

A stochastic sampler step of a diffusion model is a Gaussian transition ``x_next ~ N(μ_θ(x, t, c), σ_t² I)``; RL on
a diffusion sampler (DDPO, Black et al. 2023, arXiv 2305.13301; Flow-GRPO, Liu et al. 2025, arXiv 2505.05470;
MVC-ZigAL, Zhang et al. 2025, arXiv 2505.20107) treats each step as an action and scores a *stored* transition under
the current parameters. All three codes average the per-element log-density over the latent dimensions instead of
summing it (it keeps PPO's clip range meaningful across resolutions), and so does :func:`gaussian_step_logprob`:

    log p(x_next | x) = mean_dims( −(x_next − μ)² / (2σ²) − log σ − ½ log 2π )                       (N,)

The builders turn a denoiser output into ``(μ, σ)`` of the transition ``x_{t_k} -> x_{t_{k+1}}`` (step ``k`` of
``K``, ``k = 0`` starts from pure noise), vectorised over rows that may sit at different steps (``k`` is a (N,)
LongTensor), so a policy can recompute every step of a trajectory in one call:

* :class:`DDIMStep` — DDIM with η > 0 (Song et al. 2021, arXiv 2010.02502, eq. 12 and 16; DDPO's
  ``ddim_step_with_logprob``), from a diffusers ``DDIMScheduler``'s ``alphas_cumprod``.
* :class:`LCMStep` — the Latent Consistency Model's stochastic multistep sampler (Luo et al. 2023, arXiv
  2310.04378, Algorithm 1; diffusers ``LCMScheduler``; MVC-ZigAL's ``lcm_scheduler.py`` log-prob).
* :class:`FlowSDEStep` — Flow-GRPO's reverse-time SDE of a rectified-flow model (arXiv 2505.05470, eq. 9-10, noise
  level ``a``), from a diffusers ``FlowMatchEulerDiscreteScheduler``'s sigmas.

The pure functions :func:`ddim_step_stats`, :func:`lcm_step_stats` and :func:`flow_sde_step_stats` hold the
formulas on broadcastable per-row scalars; the builder modules hold the per-step tables (buffers, float64) and
gather them by ``k``.

The last step's variance, explicitly:

* DDIM: ``σ_K = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)`` is exactly 0 when the last step lands on
  ``ᾱ_prev = 1`` (``set_alpha_to_one=True``) or when ``ᾱ_prev = ᾱ_t`` (last timestep 0 with
  ``set_alpha_to_one=False``): a deterministic step has no density. :class:`DDIMStep` refuses such a schedule at
  construction (one-line error naming the scheduler settings that fix it: ``set_alpha_to_one=False`` with
  ``steps_offset=1``, Stable Diffusion's and hence DDPO's setting, where the last step has a small positive σ).
* LCM: the last step uses ``prev = t`` (the same ᾱ, as MVC-ZigAL's code does), so ``σ² = 1 − ᾱ_t > 0``; it is
  still sampled and trained, and the sample returned to the reward is that step's ``denoised`` (:meth:`output`),
  not the noisy ``x_next``.
* Flow SDE: the last step goes from ``σ_{K−1} > 0`` to 0, ``std = a √(σ/(1 − σ)) √(−dt) > 0``; the first step's
  ``σ = 1`` is replaced by the schedule's second sigma in the denominator only (Flow-GRPO's code). A consequence we
  measured and test: from σ = 1 that first step has noise variance a² and drift factor 1 − a²/2 whatever K, so the
  marginal variance after it is 1 + a⁴/4 instead of ≈ 1 (+6 % at a = 0.7); from any σ_0 < 1 the SDE's marginals
  match the ODE's at every step (tests/common/test_gaussian_step.py, 2-D Gaussian mixture with exact velocity).

Every builder checks at construction that each step's σ is finite and > 0, so every stored transition has a finite
log-prob.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from common.ops import seeded_uniform

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------------- the kernel
def gaussian_step_logprob(x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Mean over the non-batch dimensions of ``log N(x_next; mean, std²)`` (module docstring; DDPO / Flow-GRPO /
    MVC-ZigAL average, not sum). Shapes: x_next, mean (N, ...); std broadcastable to them ((N, 1, ..., 1) or ())
    -> (N,)."""
    if x_next.shape != mean.shape:
        raise ValueError(f"gaussian_step_logprob: x_next {tuple(x_next.shape)} and mean {tuple(mean.shape)} must match")
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    lp = -(x_next - mean).pow(2) / (2 * std.pow(2)) - std.log() - HALF_LOG_2PI  # (N, ...)
    return lp.flatten(1).mean(1)


def gaussian_step_entropy(std: Tensor, like: Tensor) -> Tensor:
    """Mean over dimensions of the per-element entropy ``log σ + ½ log(2πe)``. Shapes: std broadcastable to ``like``
    (N, ...) -> (N,)."""
    std = torch.as_tensor(std, dtype=like.dtype, device=like.device)
    return (std.log() + HALF_LOG_2PI + 0.5).expand_as(like).flatten(1).mean(1)


def gaussian_step_kl(mean_p: Tensor, std_p: Tensor, mean_q: Tensor, std_q: Tensor) -> Tensor:
    """Closed-form ``KL(N(μ_p, σ_p²) ‖ N(μ_q, σ_q²))`` per element, averaged over the non-batch dimensions (the same
    normalisation as the log-prob):  ``log(σ_q/σ_p) + (σ_p² + (μ_p − μ_q)²)/(2σ_q²) − ½``.
    Shapes: means (N, ...), stds broadcastable -> (N,)."""
    std_p = torch.as_tensor(std_p, dtype=mean_p.dtype, device=mean_p.device)
    std_q = torch.as_tensor(std_q, dtype=mean_p.dtype, device=mean_p.device)
    kl = (std_q / std_p).log() + (std_p.pow(2) + (mean_p - mean_q).pow(2)) / (2 * std_q.pow(2)) - 0.5  # (N, ...)
    return kl.flatten(1).mean(1)


def seeded_normal(seeds: Tensor, stream: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normals by Box-Muller on two counter-based uniform streams (``common.ops.seeded_uniform``, 24-bit):
    row b's values depend only on (seeds[b], stream, position), never on the other rows of the call, so a
    trajectory's noise is a function of its recorded seed (|z| < 5.9 from the 24-bit resolution).
    Shapes: seeds (B,) long -> (B, *shape)."""
    u1 = seeded_uniform(seeds, 2 * stream, shape).double() + 2.0 ** -25  # (B, *shape) in (0, 1)
    u2 = seeded_uniform(seeds, 2 * stream + 1, shape).double()
    return ((-2 * u1.log()).sqrt() * torch.cos(2 * math.pi * u2)).to(dtype)


# ------------------------------------------------------------------------------------------------- pure formulas
def ddim_step_stats(pred_x0: Tensor, pred_eps: Tensor, alpha_prev: Tensor, std: Tensor) -> Tensor:
    """DDIM's mean (arXiv 2010.02502, eq. 12): ``μ = √ᾱ_prev x̂0 + √(1 − ᾱ_prev − σ²) ε̂``.
    Shapes: pred_x0, pred_eps (N, ...); alpha_prev, std (N, 1, ..., 1) -> (N, ...)."""
    return alpha_prev.sqrt() * pred_x0 + (1 - alpha_prev - std.pow(2)).clamp(min=0).sqrt() * pred_eps


def ddim_std(alpha_t: Tensor, alpha_prev: Tensor, eta: float) -> Tensor:
    """``σ_t(η) = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)`` (arXiv 2010.02502, eq. 16)."""
    return eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)).sqrt()


def lcm_step_stats(denoised: Tensor, x: Tensor, alpha_t: Tensor, alpha_prev: Tensor, eta: float = 1.0
                   ) -> tuple[Tensor, Tensor]:
    """LCM's stochastic step (arXiv 2310.04378, Algorithm 1; diffusers ``LCMScheduler.step``): re-noise the
    boundary-scaled ``denoised = c_out x̂0 + c_skip x`` to ᾱ_prev, ``x_next = √ᾱ_prev denoised + √(1 − ᾱ_prev) z``:
    ``μ = √ᾱ_prev denoised``, ``σ² = 1 − ᾱ_prev`` (η = 1, MVC-ZigAL's ``eta=1.0``). For η < 1 (our extension, DDIM's
    interpolation) ``σ = η √(1 − ᾱ_prev)`` and the remaining variance is the deterministic direction of the noise
    implied by ``denoised``: ``μ += √(1 − ᾱ_prev − σ²) (x − √ᾱ_t denoised)/√(1 − ᾱ_t)``.
    Shapes: denoised, x (N, ...); alpha_t, alpha_prev (N, 1, ..., 1) -> mean (N, ...), std (N, 1, ..., 1)."""
    std = eta * (1 - alpha_prev).sqrt()
    mean = alpha_prev.sqrt() * denoised
    if eta < 1:
        eps = (x - alpha_t.sqrt() * denoised) / (1 - alpha_t).sqrt()
        mean = mean + (1 - alpha_prev - std.pow(2)).clamp(min=0).sqrt() * eps
    return mean, std


def flow_sde_std(sigma: Tensor, sigma_next: Tensor, sigma_max: Tensor | float, noise_level: float) -> Tensor:
    """Flow-GRPO's per-step noise ``std = a √(σ / (1 − σ'))`` with ``σ' = σ`` except σ = 1 -> ``sigma_max`` (the
    schedule's second sigma), in the denominator only (arXiv 2505.05470 eq. 10; ``sd3_sde_with_logprob.py``).
    Returns the *Gaussian* std of the step, ``std · √(−dt)``, dt = σ_next − σ < 0. Shapes: broadcastable."""
    denom = 1 - torch.where(sigma == 1, torch.as_tensor(sigma_max, dtype=sigma.dtype, device=sigma.device), sigma)
    return noise_level * (sigma / denom).sqrt() * (sigma - sigma_next).sqrt()


def flow_sde_step_stats(velocity: Tensor, x: Tensor, sigma: Tensor, sigma_next: Tensor, sigma_max: Tensor | float,
                        noise_level: float = 0.7) -> tuple[Tensor, Tensor]:
    """Euler-Maruyama step of Flow-GRPO's SDE (arXiv 2505.05470, eq. 9; x_σ = (1 − σ) x0 + σ ε, v = ε − x0):

        dx = [v + s²/(2σ) (x + (1 − σ) v)] dσ + s dw,   s = a √(σ/(1 − σ))
        μ = x (1 + s² dt/(2σ)) + v (1 + s² (1 − σ)/(2σ)) dt,   Gaussian std = s √(−dt),   dt = σ_next − σ < 0.

    The drift's extra term is the score correction −s²/2 ∇log p_σ (∇log p_σ(x) = −(x + (1 − σ) v)/σ), which makes
    the SDE's marginals those of the ODE ``dx = v dσ`` for any ``a``. Shapes: velocity, x (N, ...); sigma,
    sigma_next (N, 1, ..., 1) -> mean (N, ...), std (N, 1, ..., 1)."""
    denom = 1 - torch.where(sigma == 1, torch.as_tensor(sigma_max, dtype=sigma.dtype, device=sigma.device), sigma)
    s = noise_level * (sigma / denom).sqrt()  # (N, 1, ..)
    dt = sigma_next - sigma
    mean = x * (1 + s.pow(2) / (2 * sigma) * dt) + velocity * (1 + s.pow(2) * (1 - sigma) / (2 * sigma)) * dt
    return mean, s * (-dt).sqrt()


# ---------------------------------------------------------------------------------------------------- builders
def _per_row(table: Tensor, k: Tensor, like: Tensor) -> Tensor:
    """table (K,) gathered at k (N,) -> (N, 1, ..., 1) in ``like``'s dtype and device."""
    v = table.to(device=like.device)[k.to(like.device)].to(like.dtype)
    return v.view(-1, *([1] * (like.dim() - 1)))


def _x0_and_eps(model_output: Tensor, x: Tensor, alpha_t: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x̂0, ε̂) from an ε-, x0- or v-prediction (diffusers' ``prediction_type``). Shapes: (N, ...) -> (N, ...) x2."""
    a, b = alpha_t.sqrt(), (1 - alpha_t).sqrt()
    if prediction_type == "epsilon":
        return (x - b * model_output) / a, model_output
    if prediction_type == "sample":
        return model_output, (x - a * model_output) / b
    # v_prediction (checked at construction)
    return a * x - b * model_output, a * model_output + b * x


class StepBuilder(nn.Module):
    """What a diffusion sampler policy needs from a step kind (the interface; subclasses below).

    Attributes:
        num_steps: K, transitions per trajectory.
        model_timesteps: (K,) the timestep the denoiser is called with at step k (float buffer).
    """

    num_steps: int
    model_timesteps: Tensor

    def stats(self, model_output: Tensor, x: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """(μ, σ) of x_{t_{k+1}} given x = x_{t_k}. Shapes: model_output, x (N, ...); k (N,) long -> (N, ...),
        (N, 1, ..., 1)."""
        raise NotImplementedError

    def denoised(self, model_output: Tensor, x: Tensor, k: Tensor) -> Tensor:
        """The step's prediction of the clean sample. Shapes: (N, ...), (N, ...), (N,) -> (N, ...)."""
        raise NotImplementedError

    def output(self, model_output: Tensor, x: Tensor, k: Tensor, x_next: Tensor) -> Tensor:
        """The sample the chain returns after its last step (to the reward): x_next (DDIM, flow); LCM overrides."""
        return x_next

    def _check_std(self, std: Tensor) -> None:
        bad = ~(torch.isfinite(std) & (std > 0))
        if bool(bad.any()):
            raise ValueError(f"{type(self).__name__}: step(s) {bad.nonzero().flatten().tolist()} of {self.num_steps} have "
                             f"std {std[bad].tolist()}; every step needs a finite positive variance (a finite log-prob). "
                             f"{self._fix_hint}")

    _fix_hint = ""


def _scheduler_copy(scheduler, num_steps: int, what: str):
    if num_steps < 1:
        raise ValueError(f"{what}: num_steps must be >= 1, got {num_steps}")
    sched = copy.deepcopy(scheduler)  # set_timesteps mutates; the caller's scheduler stays as it was
    sched.set_timesteps(num_steps)
    return sched


def _check_prediction(sched, what: str) -> str:
    kind = sched.config.prediction_type
    if kind not in ("epsilon", "sample", "v_prediction"):
        raise ValueError(f"{what}: scheduler prediction_type must be epsilon, sample or v_prediction, got {kind!r}")
    if getattr(sched.config, "thresholding", False):
        raise ValueError(f"{what}: scheduler thresholding=True is not supported (a data-dependent rescaling of x̂0); "
                         "use clip_sample or neither")
    return kind


class DDIMStep(StepBuilder):
    """DDIM with η > 0 as a Gaussian step (DDPO's ``ddim_step_with_logprob``; arXiv 2010.02502 eq. 12, 16):

        x̂0 = (x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t  (clipped to ±clip_sample_range if the scheduler clips),
        σ_t = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev),   μ = √ᾱ_prev x̂0 + √(1 − ᾱ_prev − σ_t²) ε̂

    with ``prev = t − num_train_timesteps // K`` (diffusers' and DDPO's rule) and ``ᾱ_prev`` the scheduler's
    ``final_alpha_cumprod`` when prev < 0. ε̂ is not re-derived from a clipped x̂0 (DDPO's default).

    Args:
        scheduler: a diffusers ``DDIMScheduler`` (copied; the schedule comes from ``set_timesteps(num_steps)``).
        num_steps: K.
        eta: η > 0 (DDPO: 1).
    """

    _fix_hint = ("DDIM's last step is deterministic when it lands on ᾱ_prev = 1 or ᾱ_prev = ᾱ_t: build the "
                 "DDIMScheduler with set_alpha_to_one=False and steps_offset=1 (Stable Diffusion's and DDPO's setting)")

    def __init__(self, scheduler, num_steps: int = 4, eta: float = 1.0):
        super().__init__()
        if not eta > 0:
            raise ValueError(f"DDIMStep: eta must be > 0 (a stochastic step), got {eta}")
        sched = _scheduler_copy(scheduler, num_steps, "DDIMStep")
        self.prediction_type = _check_prediction(sched, "DDIMStep")
        self.clip = float(sched.config.clip_sample_range) if sched.config.clip_sample else None
        self.num_steps, self.eta = num_steps, eta
        ac = sched.alphas_cumprod.double()  # (T_train,)
        t = sched.timesteps.long()  # (K,)
        prev = t - sched.config.num_train_timesteps // num_steps
        final = torch.as_tensor(sched.final_alpha_cumprod, dtype=torch.float64)
        alpha_t = ac[t]
        alpha_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
        std = ddim_std(alpha_t, alpha_prev, eta)
        self.register_buffer("model_timesteps", t.double(), persistent=False)
        self.register_buffer("alpha_t", alpha_t, persistent=False)  # (K,)
        self.register_buffer("alpha_prev", alpha_prev, persistent=False)  # (K,)
        self.register_buffer("std", std, persistent=False)  # (K,)
        self._check_std(std)

    def _x0_eps(self, model_output: Tensor, x: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        x0, eps = _x0_and_eps(model_output, x, _per_row(self.alpha_t, k, x), self.prediction_type)
        return (x0.clamp(-self.clip, self.clip) if self.clip is not None else x0), eps

    def stats(self, model_output: Tensor, x: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        x0, eps = self._x0_eps(model_output, x, k)  # (N, ...)
        std = _per_row(self.std, k, x)  # (N, 1, ..)
        return ddim_step_stats(x0, eps, _per_row(self.alpha_prev, k, x), std), std

    def denoised(self, model_output: Tensor, x: Tensor, k: Tensor) -> Tensor:
        return self._x0_eps(model_output, x, k)[0]


class LCMStep(StepBuilder):
    """The LCM stochastic multistep step (module docstring; :func:`lcm_step_stats`), on a diffusers ``LCMScheduler``:

        x̂0 from the model output (ε, x0 or v), clipped if the scheduler clips;
        denoised = c_out(t) x̂0 + c_skip(t) x_t   (``get_scalings_for_boundary_condition_discrete``);
        μ = √ᾱ_prev denoised,  σ² = 1 − ᾱ_prev,  prev = the next timestep of the schedule, and prev = t at the last
        step (MVC-ZigAL's code: the last step is still noisy and trained; :meth:`output` returns its ``denoised``).

    Args:
        scheduler: a diffusers ``LCMScheduler`` (copied; ``set_timesteps(num_steps)``).
        num_steps: K.
        eta: 1 = LCM / MVC-ZigAL; 0 < η < 1 keeps part of the noise deterministic (:func:`lcm_step_stats`).
    """

    def __init__(self, scheduler, num_steps: int = 4, eta: float = 1.0):
        super().__init__()
        if not 0 < eta <= 1:
            raise ValueError(f"LCMStep: eta must be in (0, 1], got {eta}")
        sched = _scheduler_copy(scheduler, num_steps, "LCMStep")
        self.prediction_type = _check_prediction(sched, "LCMStep")
        self.clip = float(sched.config.clip_sample_range) if sched.config.clip_sample else None
        self.num_steps, self.eta = num_steps, eta
        ac = sched.alphas_cumprod.double()
        t = sched.timesteps.long()  # (K,)
        prev = torch.cat([t[1:], t[-1:]])  # (K,): the last step re-noises to its own level
        c_skip, c_out = zip(*(sched.get_scalings_for_boundary_condition_discrete(int(s)) for s in t))
        alpha_t, alpha_prev = ac[t], ac[prev]
        self.register_buffer("model_timesteps", t.double(), persistent=False)
        self.register_buffer("alpha_t", alpha_t, persistent=False)
        self.register_buffer("alpha_prev", alpha_prev, persistent=False)
        self.register_buffer("c_skip", torch.tensor(c_skip, dtype=torch.float64), persistent=False)
        self.register_buffer("c_out", torch.tensor(c_out, dtype=torch.float64), persistent=False)
        self._check_std(eta * (1 - alpha_prev).sqrt())

    def denoised(self, model_output: Tensor, x: Tensor, k: Tensor) -> Tensor:
        x0, _ = _x0_and_eps(model_output, x, _per_row(self.alpha_t, k, x), self.prediction_type)
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        return _per_row(self.c_out, k, x) * x0 + _per_row(self.c_skip, k, x) * x

    def stats(self, model_output: Tensor, x: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return lcm_step_stats(self.denoised(model_output, x, k), x, _per_row(self.alpha_t, k, x),
                              _per_row(self.alpha_prev, k, x), self.eta)

    def output(self, model_output: Tensor, x: Tensor, k: Tensor, x_next: Tensor) -> Tensor:
        return self.denoised(model_output, x, k)


class FlowSDEStep(StepBuilder):
    """Flow-GRPO's SDE step (:func:`flow_sde_step_stats`) on a diffusers ``FlowMatchEulerDiscreteScheduler``
    (velocity prediction v = ε − x0, x_σ = (1 − σ) x0 + σ ε; the denoiser is called at ``σ · num_train_timesteps``).

    Args:
        scheduler: a diffusers ``FlowMatchEulerDiscreteScheduler`` (copied; ``set_timesteps(num_steps)``), or None
            with ``sigmas`` given.
        num_steps: K.
        noise_level: a (Flow-GRPO: 0.7).
        sigmas: an explicit decreasing schedule (K + 1,) ending at 0 (tests, custom schedules); overrides the
            scheduler's.
        num_train_timesteps: the denoiser's timestep scale when ``scheduler`` is None.
    """

    def __init__(self, scheduler=None, num_steps: int = 10, noise_level: float = 0.7,
                 sigmas: list[float] | None = None, num_train_timesteps: int = 1000):
        super().__init__()
        if not noise_level > 0:
            raise ValueError(f"FlowSDEStep: noise_level must be > 0, got {noise_level}")
        if sigmas is None:
            if scheduler is None:
                raise ValueError("FlowSDEStep: give a scheduler (FlowMatchEulerDiscreteScheduler) or sigmas")
            sched = _scheduler_copy(scheduler, num_steps, "FlowSDEStep")
            s = sched.sigmas.double()  # (K + 1,), last 0
            num_train_timesteps = sched.config.num_train_timesteps
        else:
            s = torch.as_tensor(sigmas, dtype=torch.float64)
            num_steps = s.numel() - 1
        if s.dim() != 1 or s.numel() < 2 or not bool((s[1:] < s[:-1]).all()) or float(s[-1]) != 0 or float(s[0]) > 1:
            raise ValueError(f"FlowSDEStep: sigmas must decrease from <= 1 to 0 with K + 1 >= 2 entries, got {s.tolist()}")
        self.num_steps, self.noise_level = num_steps, noise_level
        self.register_buffer("sigma", s[:-1].clone(), persistent=False)  # (K,)
        self.register_buffer("sigma_next", s[1:].clone(), persistent=False)  # (K,)
        self.sigma_max = float(s[1])  # Flow-GRPO's sigma_max = the schedule's second sigma
        self.register_buffer("model_timesteps", s[:-1] * num_train_timesteps, persistent=False)
        self._check_std(flow_sde_std(self.sigma, self.sigma_next, self.sigma_max, noise_level))

    def stats(self, model_output: Tensor, x: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return flow_sde_step_stats(model_output, x, _per_row(self.sigma, k, x), _per_row(self.sigma_next, k, x),
                                   self.sigma_max, self.noise_level)

    def denoised(self, model_output: Tensor, x: Tensor, k: Tensor) -> Tensor:
        return x - _per_row(self.sigma, k, x) * model_output  # x0 = x − σ v

    def ode_step(self, model_output: Tensor, x: Tensor, k: Tensor) -> Tensor:
        """The deterministic Euler step of the probability-flow ODE, x + v dt (the sampler the SDE's marginals
        match). Shapes: (N, ...), (N, ...), (N,) -> (N, ...)."""
        return x + model_output * (_per_row(self.sigma_next, k, x) - _per_row(self.sigma, k, x))


__all__ = ["gaussian_step_logprob", "gaussian_step_entropy", "gaussian_step_kl", "seeded_normal", "ddim_step_stats",
           "ddim_std", "lcm_step_stats", "flow_sde_std", "flow_sde_step_stats", "StepBuilder", "DDIMStep", "LCMStep",
           "FlowSDEStep"]
