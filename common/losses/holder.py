"""HölderPO: a sequence-level PPO clip on the Hölder (power) mean of the token ratios, with an annealed exponent
(Hölder Policy Optimisation, arXiv 2605.12058; code github.com/YihangChen9/HolderPO, ``train_zero_math_holder.py``,
``critic_type_modify=holder``).

Notation (code -> paper): ``log_ratio`` -> Δ_it = ℓ_it − ℓ^old_it, ``p`` -> the Hölder exponent p,
``holder_mean_ratio`` -> R_i(p).

    R_i(p) = ( (1/L_i) Σ_t m_it exp(p·Δ_it) )^{1/p}       p ≠ 0       Hölder mean of the token ratios ρ_it
    R_i(0) = exp( (1/L_i) Σ_t m_it Δ_it )                  |p| < 1e-6  geometric mean (GMPO/GSPO)
    loss   = (1/B') Σ_i max(−A_i R_i, −A_i clip(R_i, 1 − ε, 1 + ε))         sequence-level PPO clip
    p(s)   = p_max − (p_max − p_min)·min(1, s/S)                            schedule "linear_dec" (default)

p = 1 is the arithmetic mean of ρ (a sequence-level GRPO ratio), p → 0 the geometric mean, p = −1 the harmonic
mean. ∂R_i/∂ℓ_it = R_i·softmax_t(p·Δ_i)_t: large p concentrates the gradient on the tokens whose ratio moved
most, negative p on those that moved least; at ρ ≡ 1 every p gives the same gradient.

Deviations from the authors' code: Δ is clamped to ±20 before exp (the code does not; p < 0 with ρ → 0
overflows there; the loss passes 20 per call, the library's bound ``common.ops.MAX_LOG_RATIO`` is ±10); R is
computed in log space with a max-shift (same value, never inf); sequences with no valid token are excluded
(R = 1, zero loss) and the mean is over the B' non-empty sequences of the optimiser batch.
The ``holder_token`` and ``sequence_w_clip`` variants of the code are not implemented.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from common.losses.aggregate import Normaliser
from common.losses.base import LossOutput, PolicyLoss
from common.losses.ppo_clip import clipped_surrogate
from common.ops import MAX_LOG_RATIO, masked_sum

if TYPE_CHECKING:
    from common.batch import RolloutBatch

# |p| below this is treated as p = 0 (the geometric mean), the limit of the power mean; the code's threshold.
_P_ZERO = 1e-6

Schedule = Literal["linear_dec", "linear", "sin", "cos", "quad", "quad_dec", "cubic", "cubic_dec", "constant"]
SCHEDULES: tuple[str, ...] = Schedule.__args__


def holder_mean_log_ratio(log_ratio: Tensor, mask: Tensor, p: float, *, max_log_ratio: float = MAX_LOG_RATIO) -> Tensor:
    """log R_i(p), the log of the Hölder mean of the token ratios ``R_i(p) = ((1/L_i) Σ_t m_it exp(pΔ_it))^{1/p}``
    (arXiv 2605.12058), with Δ clamped to ±``max_log_ratio`` first: with p < 0 a token whose ratio collapsed
    (Δ → −∞) would otherwise overflow exp(pΔ) to inf (the authors' code has no guard); beyond the clamp the token
    gets no gradient, as a PPO clip would do. A power mean lies between its terms, so |log R| <= max_log_ratio.

    Naive reference: ``log((exp(p·Δ)[mask_i].mean())**(1/p))``, and ``Δ[mask_i].mean()`` at p = 0. Computed as
    ``(c + log1p(mean_t expm1(pΔ − c)))/p`` with ``c = max_t pΔ`` (detached), which is finite for any p and
    exact near p = 0. Shapes: log_ratio, mask (B, T) -> (B,). A row with no valid token gives log R = 0.
    """
    if log_ratio.dim() != 2 or log_ratio.shape != mask.shape:
        raise ValueError(f"log_ratio {tuple(log_ratio.shape)} and mask {tuple(mask.shape)} must both be (B, T)")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (B, T), got {mask.dtype}")
    if not math.isfinite(p):
        raise ValueError(f"p must be a finite float, got {p}")
    delta = torch.where(mask, log_ratio.clamp(-max_log_ratio, max_log_ratio), torch.zeros_like(log_ratio))  # (B, T)
    L = mask.sum(1).clamp(min=1).to(delta.dtype)  # (B,)
    if abs(p) < _P_ZERO:
        return delta.sum(1) / L  # (B,) log of the geometric mean; empty rows: 0
    x = p * delta  # (B, T)
    c = x.masked_fill(~mask, -torch.inf).amax(1).detach()  # (B,) shift: every exponent below is <= 0
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    e = torch.where(mask, torch.expm1(x - c[:, None]), torch.zeros_like(x))  # (B, T) in (−1, 0]
    log_mean = c + torch.log1p(e.sum(1) / L)  # (B,) log((1/L) Σ exp(pΔ)); empty rows: 0
    return log_mean / p


def holder_mean_ratio(log_ratio: Tensor, mask: Tensor, p: float, *, max_log_ratio: float = MAX_LOG_RATIO) -> Tensor:
    """R_i(p) = exp(:func:`holder_mean_log_ratio`), the Hölder mean of the token ratios. Shapes: (B, T) -> (B,);
    a row with no valid token gives R = 1."""
    return torch.exp(holder_mean_log_ratio(log_ratio, mask, p, max_log_ratio=max_log_ratio))


def holder_p(step: int, *, p_max: float = 2.0, p_min: float = -2.0, schedule: Schedule = "linear_dec",
             total_steps: int = 500) -> float:
    """The exponent p at optimiser step ``step``, with ``x = min(1, step/total_steps)``, mid/amp = (p_max ± p_min)/2:

        linear_dec p_max − (p_max − p_min)x        linear   p_min + (p_max − p_min)x
        quad       p_min + (p_max − p_min)x²       quad_dec p_max − (p_max − p_min)x²
        sin        mid − amp·cos(πx)               cos      mid + amp·cos(πx)
        cubic      mid + amp(2x − 1)³              cubic_dec mid − amp(2x − 1)³        constant p_max
    """
    x = min(1.0, max(step, 0) / total_steps)
    mid, amp, span = 0.5 * (p_max + p_min), 0.5 * (p_max - p_min), p_max - p_min
    values = {
        "linear_dec": p_max - span * x, "linear": p_min + span * x,
        "quad": p_min + span * x**2, "quad_dec": p_max - span * x**2,
        "sin": mid - amp * math.cos(math.pi * x), "cos": mid + amp * math.cos(math.pi * x),
        "cubic": mid + amp * (2 * x - 1) ** 3, "cubic_dec": mid - amp * (2 * x - 1) ** 3,
        "constant": p_max,
    }
    if schedule not in values:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return values[schedule]


class HolderPolicyLoss(PolicyLoss):
    """HölderPO's sequence-level clipped surrogate on ``R_i(p)`` (see the module docstring).

    p is a pure function of the optimiser step (``set_step``), so a resumed run continues the schedule from the
    checkpoint's global step. Pair it with ``GRPO(scale="group", eps=1e-8)`` advantages, as the authors' script
    does (``critic_type=grpo``).

    Args:
        p_max: largest exponent of the schedule (code default 2; "linear_dec" starts here).
        p_min: smallest exponent (code default −2; "linear_dec" ends here).
        schedule: one of "linear_dec" (code default), "linear", "sin", "cos", "quad", "quad_dec", "cubic",
            "cubic_dec", "constant" (p = p_max throughout).
        total_steps: S, the optimiser steps over which p anneals (code 500); p stays at its end value after.
        eps: the sequence-level clip range, R in [1 − eps, 1 + eps] (code 0.2).
    """

    def __init__(self, p_max: float = 2.0, p_min: float = -2.0, schedule: Schedule = "linear_dec",
                 total_steps: int = 500, eps: float = 0.2):
        problems = []
        if not (math.isfinite(p_max) and math.isfinite(p_min)) or p_min > p_max:
            problems.append(f"p_min <= p_max must be finite floats, got p_min={p_min}, p_max={p_max}")
        if schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not isinstance(total_steps, int) or total_steps < 1:
            problems.append(f"total_steps must be a positive integer, got {total_steps!r}")
        if not 0 <= eps < 1:
            problems.append(f"eps must be in [0, 1), got {eps}")
        if problems:
            raise ValueError("HolderPolicyLoss: " + "; ".join(problems))
        self.p_max, self.p_min, self.schedule, self.total_steps, self.eps = p_max, p_min, schedule, total_steps, eps
        self.p = holder_p(0, p_max=p_max, p_min=p_min, schedule=schedule, total_steps=total_steps)

    def set_step(self, global_step: int) -> None:
        self.p = holder_p(global_step, p_max=self.p_max, p_min=self.p_min, schedule=self.schedule,
                          total_steps=self.total_steps)

    def __call__(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                 ref_logprobs: Tensor | None = None, entropy: Tensor | None = None,
                 normaliser: Normaliser | None = None, batch: "RolloutBatch | None" = None) -> LossOutput:
        """Shapes: logprobs, old_logprobs, mask (B, T); advantages (B,) (sequence-level only)."""
        if logprobs.shape != old_logprobs.shape:
            raise ValueError(f"logprobs {tuple(logprobs.shape)} and old_logprobs {tuple(old_logprobs.shape)} must match")
        B = logprobs.shape[0]
        if advantages.dim() == 2 and advantages.shape[1] == 1:
            advantages = advantages[:, 0]
        if advantages.shape != (B,):
            raise ValueError(f"advantages must be sequence-level (B,) = ({B},) for HölderPO, got {tuple(advantages.shape)}")
        norm = normaliser if normaliser is not None else Normaliser.of(mask)
        # Δ clamped at ±20, not the library's ±10 (module docstring, Deviations)
        log_R = holder_mean_log_ratio(logprobs - old_logprobs, mask, self.p, max_log_ratio=20.0)  # (B,)
        valid = mask.any(1)  # (B,) empty completions are excluded
        per_seq, R, was_clipped = clipped_surrogate(  # (B,) each; |log R| <= 20 already, so no second clamp
            log_R, torch.zeros_like(log_R), advantages, valid, eps_low=self.eps, eps_high=self.eps, max_log_ratio=math.inf)
        loss = per_seq.sum() / norm.num_sequences
        metrics = {
            "pg_loss": loss.detach(),
            "holder_p": torch.tensor(self.p, device=loss.device) * valid.sum().detach() / norm.num_sequences,
            "clip_frac": was_clipped.sum().detach().float() / norm.num_sequences,
            "ratio": R.sum().detach() / norm.num_sequences,  # R is 0 on empty rows
        }
        if entropy is not None:
            metrics["entropy"] = masked_sum(entropy, mask).detach() / norm.num_tokens
        return LossOutput(loss=loss, metrics=metrics)
