"""MVC-ZigAL: zigzag (ZMV) sampling, the MV-ZigAL paired regression loss and the MVC Lagrangian.

Zhang et al., "Refining Few-Step Text-to-Multiview Diffusion via Reinforcement Learning" (arXiv 2505.20107,
CVPR 2026; code ``ZiyiZhang27/MVC-ZigAL``). Spec: shared/methods/domains.md §2. The denoising of all ``Nv`` views
is one MDP (the sampler policy's row is one prompt's joint latent, its actions the K denoising transitions), and
three parts plug into the shared loop:

1. **ZMV sampling** (:func:`zigzag_state`, :class:`ZigzagFirstStep`): at the first step only, denoise the initial
   noise with strong guidance ``x_T -> x'`` (ω_high), invert it with weak guidance ``x' -> x̃_T`` (ω_low, a
   deterministic DDIM inversion: ε̂ = ε_θ(x', t_prev; ω_low), x̂_0 = (x' − √(1−ᾱ_prev) ε̂)/√ᾱ_prev,
   x̃_T = √ᾱ_T x̂_0 + √(1−ᾱ_T) ε̂), then take the ordinary first transition from ``x̃_T``. The stored first
   transition is (state x̃_T, action x_{t_1}) with the ordinary sampler's log-prob; every later step is ordinary,
   so a zigzag trajectory has the shapes of a standard one and differs from it only in its first transition.
   :class:`ZigzagFirstStep` is the ``first_step`` hook of ``common.policies.diffusion.DiffusionSamplerPolicy``;
   :class:`ZigzagPairs` (a method replacing the rollout) samples each noise twice, standard and zigzag.
   (The spec writes the inversion with ᾱ_t on both sides; we invert from the level x' is at, ᾱ_prev, which is
   what DDIM inversion is; with the spec's form a one-step sampler would not return to x_T even for ω_low = ω_high.)

2. **MV-ZigAL loss** (:class:`ZigALLoss`): rows come in pairs (standard S, zigzag Z) drawn from the same initial
   noise (the declared field ``zigzag`` (B,) marks the Z row of each pair; pairs are adjacent rows). With
   Δ_θ(x) = ℓ_θ(x) − ℓ_old(x) the per-step log-likelihood ratio of a stored transition (ℓ: the step log-prob, mean
   over latent dims, §0.4),

       d   = Δ_θ(Z) − Δ_θ(S),                 a = A(Z) − A(S)
       d_c = clip(Δ_θ(Z), ±ε) − clip(Δ_θ(S), ±ε)              (ℓ_θ clamped to ℓ_old ± clip_range)
       L   = mean_{pairs, steps} max((d/η − a)², (d_c/η − a)²)

   (paper: the regression of the difference of the two trajectories' log-likelihood ratios, with temperature
   1/η, onto the difference of their advantages; code η = 1, clip_range 1e-4). The code shuffles the step order
   per prompt and takes one optimiser step per micro-batch of steps; here every step of a pair is in the same
   micro-batch (the sum over steps is order-free), so no shuffle is needed.

3. **MVC Lagrangian** (:class:`LagrangianConstraint`, :class:`MVCAdvantage`): maximise per-view fidelity R
   subject to the joint-view reward R_mv staying above a self-paced threshold τ:

       R̄_mv = mean R_mv over the batch (both sets, all ranks)
       τ ← R̄_mv at the first update, then τ ← β_τ τ + (1 − β_τ) R̄_mv         (β_τ = 0.99; τ before λ)
       λ ← clamp(λ + α (τ − R̄_mv), 0, λ_max),  α = α⁺ (0.1) if R̄_mv < τ else α⁻ (0.01),  λ_max = 5
       A_mvc = (z(R) + λ z(R_mv)) / (1 + λ)                                    (z: global z-score)

   The code z-scores each reward before combining (``normalise_before_combine=True``, our default); the paper's
   literal R_mvc = (R + λ R_mv)/(1 + λ), z-scored after, is the flag's other value. MV-ZigAL (joint only) is
   ``mode="joint"`` (A := z(R_mv)), per-view only ``mode="per_view"`` (A := z(R)), a fixed weighted sum
   ``mode="fixed"`` (λ stays λ_init).

Simplification (stated): the sampler's row is a prompt's joint latent over all views, so the per-view fidelity
enters as the row's reward component (the mean over views of the per-view score) and A is per row, not per view;
the log-prob of a joint transition is the mean over every latent dim of every view (= the mean of the per-view
means). DDPO-style clipped PG, the baseline, is ``common.losses.ppo_clip.ClippedPolicyLoss`` on the (B, K) step
log-probs (``aggregation: token_mean``, clip 1e-4): it needs nothing from this file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from common.batch import RolloutBatch
from common.losses.aggregate import Normaliser
from common.losses.base import LossOutput, PolicyLoss, check_token_shapes
from common.methods.base import Method

if TYPE_CHECKING:
    from common.loop import Loop


# ---------------------------------------------------------------------------------------------- ZMV sampling
def ddim_invert(x_prev: Tensor, eps: Tensor, alpha_prev: Tensor | float, alpha_t: Tensor | float) -> Tensor:
    """Deterministic DDIM re-noising of ``x_prev`` (at level ᾱ_prev) to level ᾱ_t with the noise prediction ``eps``:
    x̂_0 = (x_prev − √(1−ᾱ_prev) ε̂)/√ᾱ_prev, x_t = √ᾱ_t x̂_0 + √(1−ᾱ_t) ε̂. Shapes: x_prev, eps (B, ...); the
    alphas scalars or (B,) (broadcast over the trailing dims)."""
    if x_prev.shape != eps.shape:
        raise ValueError(f"ddim_invert: x_prev {tuple(x_prev.shape)} and eps {tuple(eps.shape)} must have one shape")
    a_prev, a_t = (_per_row(torch.as_tensor(a, dtype=x_prev.dtype, device=x_prev.device), x_prev)
                   for a in (alpha_prev, alpha_t))
    x0 = (x_prev - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()  # (B, ...)
    return a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps


def _per_row(a: Tensor, like: Tensor) -> Tensor:
    return a.reshape(a.shape + (1,) * (like.dim() - a.dim())) if a.dim() else a


def zigzag_state(x_T: Tensor, *, denoise: Callable[[Tensor], Tensor], predict_eps: Callable[[Tensor], Tensor],
                 alpha_t: Tensor | float, alpha_prev: Tensor | float, iterations: int = 1) -> Tensor:
    """ZMV's zigzag at the first step: ``iterations`` times, x ← invert(denoise(x)). -> x̃_T, shaped like ``x_T``.

    Args:
        x_T: (B, ...) the initial noise (all views of a prompt in one row).
        denoise: ``x (B, ...) -> x' (B, ...)``, the sampler's first transition t -> t_prev with strong guidance ω_high.
        predict_eps: ``x' -> ε̂ (B, ...)``, the noise prediction at (x', t_prev) with weak guidance ω_low.
        alpha_t, alpha_prev: ᾱ at the first timestep and at the next one.
        iterations: zigzag iterations T_max (1 in the paper's code).
    """
    if iterations < 1:
        raise ValueError(f"zigzag_state: iterations must be >= 1, got {iterations}")
    x = x_T
    for _ in range(iterations):  # ok: T_max zigzags (1), not a loop over the batch
        x_prime = denoise(x)  # (B, ...) at level ᾱ_prev
        x = ddim_invert(x_prime, predict_eps(x_prime), alpha_prev, alpha_t)  # (B, ...) back at level ᾱ_t
    return x


class ZigzagFirstStep:
    """ZMV sampling's first-step settings: ω_high for the denoise, ω_low for the inversion (1.0 = the conditional
    prediction only, 0.0 = unconditional), T_max zigzag iterations. The sampler calls :meth:`state` with its own
    first-step functions and takes its ordinary first transition from the result."""

    def __init__(self, omega_high: float = 7.0, omega_low: float = 1.0, iterations: int = 1):
        problems = []
        if omega_low < 0 or omega_high < 0:
            problems.append(f"omega_high and omega_low must be >= 0 (guidance scales), got {omega_high}, {omega_low}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            problems.append(f"iterations must be an integer >= 1 (zigzags at the first step), got {iterations!r}")
        if problems:
            raise ValueError("ZigzagFirstStep: " + "; ".join(problems))
        self.omega_high, self.omega_low, self.iterations = float(omega_high), float(omega_low), iterations

    def state(self, x_T: Tensor, *, step: Callable[[Tensor, float], Tensor], eps: Callable[[Tensor, float], Tensor],
              alpha_t: Tensor | float, alpha_prev: Tensor | float) -> Tensor:
        """x̃_T from ``x_T``: ``step(x, ω)`` is the first transition's mean (or a sample) with guidance ω,
        ``eps(x', ω)`` the noise prediction at the next timestep with guidance ω."""
        return zigzag_state(x_T, denoise=lambda x: step(x, self.omega_high), predict_eps=lambda x: eps(x, self.omega_low),
                            alpha_t=alpha_t, alpha_prev=alpha_prev, iterations=self.iterations)

    @torch.no_grad()
    def __call__(self, policy, x_T: Tensor, cond: Tensor, seeds: Tensor) -> Tensor:
        """The ``first_step`` hook of ``common.policies.diffusion.DiffusionSamplerPolicy``: the zigzag's denoise is the
        *mean* of the policy's first transition at ω_high (deterministic, as Zigzag Diffusion Sampling's DDIM
        denoise), its ε̂ the policy's noise prediction at the second timestep with ω_low; ᾱ from the step builder's
        tables (DDIM or LCM; a flow-matching step has none and is refused). Shapes: x_T (B, C, H, W), cond (B, ...),
        seeds (B,) -> (B, C, H, W)."""
        step = policy.step
        if not (hasattr(step, "alpha_t") and hasattr(step, "alpha_prev")) or step.num_steps < 2:
            raise ValueError(f"ZigzagFirstStep: needs a DDIM or LCM step builder with >= 2 steps (ᾱ tables), got "
                             f"{type(step).__name__} with {step.num_steps} steps")
        B, dev = x_T.shape[0], x_T.device
        k0, k1 = (torch.full((B,), k, dtype=torch.long, device=dev) for k in (0, 1))

        def denoise(x: Tensor, omega: float) -> Tensor:  # (B, C, H, W) the first transition's mean at ω
            return step.stats(policy.model_output(x, k0, cond, scale=omega), x, k0)[0]

        def predict_eps(x: Tensor, omega: float) -> Tensor:  # ε̂ at the second timestep (x' sits at ᾱ_prev of step 0)
            out = policy.model_output(x, k1, cond, scale=omega)
            if step.prediction_type == "epsilon":
                return out
            a = step.alpha_t[1].to(x)
            x0 = step.denoised(out, x, k1) if step.prediction_type == "sample" else a.sqrt() * x - (1 - a).sqrt() * out
            return (x - a.sqrt() * x0) / (1 - a).sqrt()

        return self.state(x_T, step=denoise, eps=predict_eps, alpha_t=step.alpha_t[0].to(x_T),
                          alpha_prev=step.alpha_prev[0].to(x_T))


class ZigzagPairs(Method):
    """MVC-ZigAL's rollout: for each prompt, ``n // 2`` initial noises, each sampled twice — a standard trajectory
    (S) and a zigzag one (Z, :class:`ZigzagFirstStep` as the policy's first-step hook) — from the same seed, so the
    same x_T and the same step noises. Rows are interleaved (S, Z) pairs with ``zigzag`` marking Z; the group id is
    the prompt. Equal samples with a PG baseline of ``n`` standard trajectories per prompt (the zigzag's extra
    2 NFEs per Z row are not counted as samples, as in the paper).

    Args:
        first_step: the zigzag settings (default ω_high = the policy's guidance, ω_low = 1).
        omega_high, omega_low, iterations: shortcuts for ``first_step``'s fields when it is not given
            (omega_high None = the policy's guidance scale).
    """

    provides = ("zigzag",)

    def __init__(self, first_step: ZigzagFirstStep | None = None, omega_high: float | None = None,
                 omega_low: float = 1.0, iterations: int = 1):
        super().__init__()
        self.first_step = first_step
        self._settings = (omega_high, omega_low, iterations)
        if first_step is None:
            ZigzagFirstStep(omega_high if omega_high is not None else 1.0, omega_low, iterations)  # check the arguments

    def setup(self, loop: "Loop") -> None:
        problems = []
        if not hasattr(loop.policy, "sample_batch"):
            problems.append(f"the policy must be a DiffusionSamplerPolicy (sample_batch with a first_step hook), got "
                            f"{type(loop.policy).__name__}")
        if loop.group_size % 2:
            problems.append(f"group_size must be even (n/2 (standard, zigzag) pairs per prompt), got {loop.group_size}")
        for name in ("minibatch_size", "micro_batch_size"):
            v = getattr(loop, name)
            if v is not None and v % 2:
                problems.append(f"{name} must be even (a pair never splits), got {v}")
        if problems:
            raise ValueError("ZigzagPairs: " + "; ".join(problems))
        if self.first_step is None:
            high, low, it = self._settings
            g = getattr(loop.policy, "guidance", None)
            self.first_step = ZigzagFirstStep(high if high is not None else (g.scale if g is not None else 1.0), low, it)

    @torch.no_grad()
    def rollout(self, loop: "Loop", prompts, n: int) -> RolloutBatch:
        policy = loop.policy
        m = n // 2
        cond = policy.encode(policy.prompt_texts(prompts)).repeat_interleave(m, 0)  # (P·m, ...)
        P, dev = len(prompts), cond.device
        group = torch.arange(P, device=dev).repeat_interleave(m)  # (P·m,)
        seeds = torch.randint(0, 2**62, (P * m,), device=dev)  # (P·m,) one noise per pair
        samples = [dict(p) if isinstance(p, dict) else {policy.prompt_key: p} for p in prompts for _ in range(m)]
        std = policy.sample_batch(cond, seeds, group, samples)
        zz = policy.sample_batch(cond, seeds, group, [dict(s) for s in samples], first_step=self.first_step)
        both = RolloutBatch.cat([std, zz])  # S rows then Z rows
        order = torch.stack([torch.arange(P * m), torch.arange(P * m) + P * m], 1).flatten()  # (2·P·m,) S0 Z0 S1 Z1 ..
        both = both.select(order)
        return both.replace(group_ids=group.repeat_interleave(2),
                            zigzag=(torch.arange(2 * P * m, device=dev) % 2 == 1))


# ---------------------------------------------------------------------------------------------- MV-ZigAL loss
def zigal_pair_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, zigzag: Tensor, *,
                    clip_range: float = 1e-4, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-(pair, step) MV-ZigAL terms max((d/η − a)², (d_c/η − a)²) (module docstring) and the pair mask.

    Shapes: logprobs, old_logprobs, mask (B, K) with B even, rows 2i and 2i+1 one (S, Z) pair in either order;
    advantages (B,) or (B, K); zigzag (B,) bool, True on the Z row of each pair. Returns ((B/2, K), (B/2, K) bool);
    a step counts when it is valid in both rows of its pair."""
    check_token_shapes(logprobs, old_logprobs, mask)
    B, K = logprobs.shape
    if B % 2:
        raise ValueError(f"zigal_pair_loss: rows must come in (standard, zigzag) pairs, got an odd batch of {B} rows; "
                         "keep micro_batch_size and minibatch_size even")
    if zigzag.shape != (B,) or zigzag.dtype != torch.bool:
        raise ValueError(f"zigzag must be a bool tensor ({B},), got {zigzag.dtype} {tuple(zigzag.shape)}")
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(B, K)  # (B, K)
    if advantages.shape != (B, K):
        raise ValueError(f"advantages must be ({B},) or ({B}, {K}), got {tuple(advantages.shape)}")
    sign = torch.where(zigzag, 1.0, -1.0).to(logprobs.dtype)[:, None]  # (B, 1): +Z, −S
    delta = logprobs - old_logprobs  # (B, K) Δ_θ
    delta_c = delta.clamp(-clip_range, clip_range)  # ℓ_θ clamped to ℓ_old ± ε
    pair = lambda t: (sign * t).reshape(B // 2, 2, K).sum(1)  # (B/2, K): Z − S
    d, d_c, a = pair(delta), pair(delta_c), pair(advantages.to(logprobs.dtype))
    terms = torch.maximum((d / eta - a) ** 2, (d_c / eta - a) ** 2)  # (B/2, K)
    pair_mask = mask.reshape(B // 2, 2, K).all(1)  # (B/2, K)
    return terms.masked_fill(~pair_mask, 0.0), pair_mask


class ZigALLoss(PolicyLoss):
    """The MV-ZigAL paired regression loss as the loop's policy loss (module docstring, item 2).

    The mean is over (pair, step) terms of the whole optimiser minibatch: Σ terms / (Normaliser.num_tokens / 2)
    (each pair's two rows count their K steps once each), so the micro-batch split never changes the gradient.

    Args:
        clip_range: ε, the clamp of ℓ_θ − ℓ_old in the clipped branch (code 1e-4).
        eta: η, the temperature of the log-ratio difference (code 1).
    """

    requires = ("zigzag",)

    def __init__(self, clip_range: float = 1e-4, eta: float = 1.0):
        problems = []
        if not clip_range > 0:
            problems.append(f"clip_range must be > 0, got {clip_range}")
        if not eta > 0:
            problems.append(f"eta must be > 0 (the temperature 1/eta of the log-ratio difference), got {eta}")
        if problems:
            raise ValueError("ZigALLoss: " + "; ".join(problems))
        self.clip_range, self.eta = float(clip_range), float(eta)

    def __call__(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                 ref_logprobs: Tensor | None = None, entropy: Tensor | None = None,
                 normaliser: Normaliser | None = None, batch: RolloutBatch | None = None) -> LossOutput:
        if batch is None or batch.zigzag is None:
            raise ValueError("ZigALLoss needs the micro-batch with RolloutBatch.zigzag (list ZigzagPairs under methods)")
        terms, pair_mask = zigal_pair_loss(logprobs, old_logprobs, advantages, mask, batch.zigzag,
                                           clip_range=self.clip_range, eta=self.eta)  # (B/2, K)
        norm = normaliser if normaliser is not None else Normaliser.of(mask)
        pairs = norm.num_tokens / 2  # () (pair, step) terms in the optimiser minibatch
        loss = terms.sum() / pairs
        delta = (logprobs - old_logprobs).detach()
        clipped = (delta.abs() > self.clip_range) & mask
        return LossOutput(loss, {"zigal_loss": loss.detach(),
                                 "clip_frac": clipped.float().sum() / norm.num_tokens,
                                 "ratio": (delta.exp() * mask).sum() / norm.num_tokens})


# ---------------------------------------------------------------------------------------------- MVC Lagrangian
class LagrangianConstraint(nn.Module):
    """λ and the self-paced threshold τ of MVC-ZigAL (module docstring, item 3), as checkpointed buffers.

    Args:
        alpha_up: α⁺, λ's step when the constraint is violated (R̄_mv < τ) (code 0.1).
        alpha_down: α⁻, λ's step otherwise (code 0.01).
        lambda_max: the upper bound of λ (code 5).
        lambda_init: λ_0 (code 0).
        tau_beta: β_τ, the EMA coefficient of τ (code 0.99).
    """

    def __init__(self, alpha_up: float = 0.1, alpha_down: float = 0.01, lambda_max: float = 5.0,
                 lambda_init: float = 0.0, tau_beta: float = 0.99):
        super().__init__()
        problems = []
        if alpha_up < 0 or alpha_down < 0:
            problems.append(f"alpha_up and alpha_down must be >= 0, got {alpha_up}, {alpha_down}")
        if not lambda_max > 0:
            problems.append(f"lambda_max must be > 0, got {lambda_max}")
        elif not 0 <= lambda_init <= lambda_max:
            problems.append(f"lambda_init must be in [0, lambda_max={lambda_max}], got {lambda_init}")
        if not 0 <= tau_beta < 1:
            problems.append(f"tau_beta must be in [0, 1), got {tau_beta}")
        if problems:
            raise ValueError("LagrangianConstraint: " + "; ".join(problems))
        self.alpha_up, self.alpha_down, self.lambda_max, self.tau_beta = alpha_up, alpha_down, lambda_max, tau_beta
        self.register_buffer("lam", torch.tensor(float(lambda_init), dtype=torch.float64))  # () λ
        self.register_buffer("tau", torch.zeros((), dtype=torch.float64))  # () τ
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))  # τ has taken its first mean
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def dual_step(self, mean_mv: Tensor) -> Tensor:
        """One iteration's update from R̄_mv (a () tensor): τ first, then λ. Returns the new λ ()."""
        m = mean_mv.detach().to(self.tau)
        self.tau.copy_(torch.where(self.initialised, self.tau_beta * self.tau + (1 - self.tau_beta) * m, m))
        self.initialised.fill_(True)
        up, down = (torch.tensor(a, dtype=self.lam.dtype, device=self.lam.device) for a in (self.alpha_up, self.alpha_down))
        step = torch.where(m < self.tau, up, down)  # () α⁺ when violated, else α⁻
        self.lam.copy_((self.lam + step * (self.tau - m)).clamp(0.0, self.lambda_max))
        self.updates += 1
        return self.lam


def zscore(x: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean) / std over all entries (population std); all-equal input gives zeros, never NaN. (N,) -> (N,)."""
    x = x.double()
    centred = x - x.mean()
    std = centred.pow(2).mean().sqrt()
    return torch.where(std > eps, centred / std.clamp(min=eps), torch.zeros_like(centred))


class MVCAdvantage(Method):
    """MVC-ZigAL's advantages: the Lagrangian update, then A_mvc = (z(R) + λ z(R_mv)) / (1 + λ), set on the batch
    in ``after_score`` (the loop then skips its estimator). R and R_mv are named reward components.

    Args:
        fidelity: name of the per-view fidelity reward component (the mean over views of the per-view score).
        joint: name of the joint-view (consistency) reward component.
        mode: "constrained" (adaptive λ, MVC-ZigAL), "fixed" (λ = lambda_init, a weighted sum), "joint" (A := z(R_mv),
            MV-ZigAL), "per_view" (A := z(R)).
        normalise_before_combine: z-score each reward before combining (code); False = the paper's literal
            R_mvc = (R + λ R_mv)/(1 + λ) z-scored after.
        constraint: the λ/τ state (default ``LagrangianConstraint()`` with the code's settings).
        adv_clip: clamp advantages to ±adv_clip (None = off).
    """

    all_gather: Callable[[Tensor], tuple[Tensor, int]] | None = None  # set by the loop: statistics over every rank

    def __init__(self, fidelity: str = "alignment", joint: str = "consistency",
                 mode: Literal["constrained", "fixed", "joint", "per_view"] = "constrained",
                 normalise_before_combine: bool = True, constraint: LagrangianConstraint | None = None,
                 adv_clip: float | None = None):
        super().__init__()
        if mode not in ("constrained", "fixed", "joint", "per_view"):
            raise ValueError(f"MVCAdvantage: mode must be 'constrained', 'fixed', 'joint' or 'per_view', got {mode!r}")
        if adv_clip is not None and not adv_clip > 0:
            raise ValueError(f"MVCAdvantage: adv_clip must be > 0 or None, got {adv_clip}")
        self.fidelity, self.joint, self.mode = fidelity, joint, mode
        self.normalise_before_combine, self.adv_clip = normalise_before_combine, adv_clip
        self.constraint = constraint if constraint is not None else LagrangianConstraint()

    def components(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        names = list(batch.reward_names)
        missing = [n for n in (self.fidelity, self.joint) if n not in names]
        if missing:
            raise ValueError(f"MVCAdvantage: reward components {missing} not among the rewards {names}; set fidelity / "
                             "joint to the reward names (a reward's name is its class name or its `name`)")
        comps = batch.reward_components  # (B, K)
        return comps[:, names.index(self.fidelity)], comps[:, names.index(self.joint)]  # (B,), (B,)

    def advantages(self, r: Tensor, r_mv: Tensor) -> Tensor:
        """(N,) rewards of the global batch -> (N,) advantages; updates λ and τ in "constrained" mode."""
        if self.mode == "constrained":
            self.constraint.dual_step(r_mv.double().mean())
        lam = self.constraint.lam.to(torch.float64)
        if self.mode == "joint":
            adv = zscore(r_mv)
        elif self.mode == "per_view":
            adv = zscore(r)
        elif self.normalise_before_combine:
            adv = (zscore(r) + lam * zscore(r_mv)) / (1 + lam)
        else:
            adv = zscore((r.double() + lam * r_mv.double()) / (1 + lam))
        if self.adv_clip is not None:
            adv = adv.clamp(-self.adv_clip, self.adv_clip)
        return adv

    def after_score(self, loop: "Loop", batch: RolloutBatch) -> RolloutBatch:
        r, r_mv = self.components(batch)  # (B,), (B,)
        start = 0
        if self.all_gather is not None:  # z-scores and R̄_mv over every rank's rows
            (both, start) = self.all_gather(torch.stack([r, r_mv], 1))
            r, r_mv = both[:, 0], both[:, 1]
        adv = self.advantages(r, r_mv)[start:start + batch.batch_size]  # (B,)
        return batch.replace(advantages=adv.to(batch.rewards.dtype))

    def after_update(self, loop: "Loop", batch: RolloutBatch) -> dict[str, Tensor]:
        return {"mvc_lambda": self.constraint.lam.float(), "mvc_tau": self.constraint.tau.float()}
