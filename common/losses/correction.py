"""Train/inference mismatch correction: importance weights between the trainer's and the sampler's log-probs.

A rollout engine (vLLM) and the trainer compute different token probabilities for the same weights (other
kernels, other reduction orders, bf16), so "on-policy" samples are in fact drawn from the sampler's μ, not from
the trainer's π_old. Truncated importance sampling (TIS; Yao, Liu, Zhang, Dong, Shang, Gao, "Your Efficient RL
Framework Secretly Brings You Off-Policy RL Training", 2025 blog, and "On the Rollout-Training Mismatch in Modern
RL Systems", NeurIPS 2025 workshop, OpenReview 8MHqvb4lK9; no arXiv id) reweights each token's policy-gradient
term by the capped ratio; masked IS (MIS; Liu et al., "When Speed Kills Stability", 2025 blog) drops the tokens or
sequences whose ratio is above the cap instead. As TRL's ``vllm_importance_sampling_mode`` and verl's
``rollout_correction``:

    log w_it = ℓ^old_it − ℓ^μ_it                           token level    (ℓ = log-prob of the sampled token)
    log w_i  = Σ_t m_it (ℓ^old_it − ℓ^μ_it)  for every t    sequence level (the product of the token ratios)
    w̃ = min(w, C) · 1[w ≥ α]                               mode "truncate" (TIS; α = 0 by default: no lower bound)
    w̃ = w · 1[α ≤ w ≤ C]                                   mode "mask"     (MIS; IcePop's two-sided band)
    w̃_it = 0 for every t of a row i the sequence rule drops  sequence_mask "any" / "geometric"
    c'_it = w̃_it · c_it                                    c = the wrapped loss's per-token surrogate

IcePop (Ling Team, "Every Step Evolves: Scaling Reinforcement Learning for Trillion-Scale Thinking Model", the
Ring-1T report, arXiv 2510.18855, §3 "IcePop"): mode "mask" with a lower bound α, i.e. M(k; α, β) = k if
k ∈ [α, β] else 0 applied to each token's k = π_train/π_infer, so a token whose ratio leaves the band gets no gradient
(α = 0.5, β = 5 in the report): ``RolloutCorrection(loss, mode="mask", lower=0.5, cap=5.0)``. Sequence-level
masking (verl's ``rollout_rs``/veto and Seq-MIS; Liu et al. 2025, "When Speed Kills Stability"): ``sequence_mask``
"any" drops a whole sequence when any of its tokens' ratios leaves ``sequence_bounds`` (default [α, C]),
"geometric" when the geometric mean exp(mean_t log w_it) does (use a tight band there, e.g. [0.99, 1.01]:
the geometric mean stays near 1).

w̃ is a constant (no gradient). Because w̃ ≥ 0 and the GRPO-family surrogates are positively homogeneous in the
advantage (PPO's c(A) = max(−A ρ, −A clip(ρ)) gives w·c(A) = c(w·A) for every w ≥ 0, dual-clip too), the
correction is applied by handing the wrapped loss the token-level advantages w̃_it · A_it: exactly the TIS/MIS
objective, with KL and entropy terms left unweighted (as TRL and verl do), and any aggregation of the wrapped
loss kept. Losses whose surrogate is not homogeneous in A would need the weight inside their own formula.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from common.losses.base import LossOutput, PolicyLoss, check_token_shapes
from common.ops import masked_sum

if TYPE_CHECKING:
    from common.batch import RolloutBatch
    from common.losses.aggregate import Normaliser

# log w is clamped to ±_MAX_LOG_WEIGHT before exp(): a sequence-level sum over hundreds of tokens can exceed the
# float range; e^20 ≈ 4.9e8 stays finite, is far above any sensible cap (so truncate/mask see it as "above C"),
# and is the clamp verl uses for its sequence-level weights.
_MAX_LOG_WEIGHT = 20.0


def importance_weights(
    old_logprobs: Tensor,
    behaviour_logprobs: Tensor,
    mask: Tensor,
    *,
    level: Literal["token", "sequence"] = "token",
    mode: Literal["truncate", "mask"] = "truncate",
    cap: float = 2.0,
    lower: float = 0.0,
    sequence_mask: Literal["none", "any", "geometric"] = "none",
    sequence_bounds: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Bounded importance weights π_old / μ of the sampled tokens (see the module docstring).

    Shapes: old_logprobs, behaviour_logprobs, mask (B, T) -> (weights (B, T) float, capped (B, T) bool); both
    are 0/False off the mask. ``capped`` marks the positions whose weight the bounds changed: raw weight above
    ``cap`` (truncated or masked), below ``lower`` (masked), or in a sequence the sequence rule dropped. A sequence
    with no valid token gets no weight (zeros), never NaN.
    """
    check_token_shapes(old_logprobs, behaviour_logprobs, mask)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (B, T), got {mask.dtype}")
    problems = _bound_problems(level, mode, cap, lower, sequence_mask, sequence_bounds)
    if problems:
        raise ValueError("; ".join(problems))
    tok_log_w = torch.where(mask, old_logprobs - behaviour_logprobs, torch.zeros_like(old_logprobs)).detach()  # (B, T)
    log_w = tok_log_w
    if level == "sequence":
        log_w = masked_sum(log_w, mask, dim=1)[:, None].expand_as(log_w)  # (B, T): Σ_t, the same for every t
    w = torch.exp(log_w.clamp(-_MAX_LOG_WEIGHT, _MAX_LOG_WEIGHT))  # (B, T)
    above, below = (w > cap) & mask, (w < lower) & mask  # (B, T) each
    w = w.clamp(max=cap) if mode == "truncate" else w.masked_fill(above, 0.0)
    w = w.masked_fill(below, 0.0)
    capped = above | below
    if sequence_mask != "none":
        lo, hi = sequence_bounds if sequence_bounds is not None else (lower, cap)
        if sequence_mask == "any":
            tok_w = torch.exp(tok_log_w.clamp(-_MAX_LOG_WEIGHT, _MAX_LOG_WEIGHT))  # (B, T) token ratios
            drop = (((tok_w < lo) | (tok_w > hi)) & mask).any(dim=1)  # (B,)
        else:  # geometric mean of the token ratios: exp(Σ_t m log w / Σ_t m)
            n = mask.sum(dim=1).clamp(min=1)  # (B,)
            geo = torch.exp((masked_sum(tok_log_w, mask, dim=1) / n).clamp(-_MAX_LOG_WEIGHT, _MAX_LOG_WEIGHT))  # (B,)
            drop = (geo < lo) | (geo > hi)  # (B,)
        dropped = drop[:, None] & mask  # (B, T)
        w, capped = w.masked_fill(dropped, 0.0), capped | dropped
    return w.masked_fill(~mask, 0.0), capped


def _bound_problems(level, mode, cap, lower, sequence_mask, sequence_bounds) -> list[str]:
    problems = []
    if level not in ("token", "sequence"):
        problems.append(f"level must be 'token' or 'sequence', got {level!r}")
    if mode not in ("truncate", "mask"):
        problems.append(f"mode must be 'truncate' or 'mask', got {mode!r}")
    if not cap > 0:
        problems.append(f"cap must be > 0 (the largest weight kept, C), got {cap}")
    if not 0 <= lower < cap:
        problems.append(f"lower must be in [0, cap) (IcePop's α, the smallest weight kept), got {lower} with cap {cap}")
    if sequence_mask not in ("none", "any", "geometric"):
        problems.append(f"sequence_mask must be 'none', 'any' or 'geometric', got {sequence_mask!r}")
    if sequence_bounds is not None and not (len(sequence_bounds) == 2 and 0 <= sequence_bounds[0] < sequence_bounds[1]):
        problems.append(f"sequence_bounds must be (low, high) with 0 <= low < high, got {sequence_bounds!r}")
    return problems


class RolloutCorrection(PolicyLoss):
    """Wrap a policy loss with TIS/MIS importance weights between the trainer's π_old and the sampler's μ.

    Reads ``batch.behaviour_logprobs`` (set ``sampling.logprobs: true`` so the rollout backend returns them) and
    the ``old_logprobs`` the update loop passes (the trainer's log-probs before this update). Logs
    ``is_ratio_mean`` (mean w̃ over valid tokens), ``is_ratio_capped_frac`` (tokens whose weight the bounds changed:
    above the cap, below ``lower``, or in a dropped sequence), ``is_ratio_masked_frac`` (tokens given weight 0: no
    gradient) and ``is_logp_diff`` (mean |ℓ^old − ℓ^μ|, the mismatch itself), as ``train/is_*`` through the module.

    Args:
        loss: the wrapped policy loss (e.g. ``ClippedPolicyLoss``); its surrogate must be positively
            homogeneous in the advantage (see the module docstring).
        level: "token" (a weight per token) or "sequence" (the product of a sequence's token ratios).
        mode: "truncate" (TIS: min(w, C)) or "mask" (MIS: w where w ≤ C, else 0).
        cap: C (IcePop's β). TRL's default is 2.0 (token) / 3.0; the TIS blog uses 2; IcePop 5.
        lower: α, weights below it get 0 in either mode (IcePop's two-sided band [α, β]: 0.5 in the Ring-1T
            report); 0 = no lower bound (plain TIS/MIS).
        sequence_mask: "none"; "any" (drop a sequence when any token's ratio leaves ``sequence_bounds``) or
            "geometric" (when the geometric mean of its token ratios does).
        sequence_bounds: (low, high) of the sequence rule; default (lower, cap).
    """

    def __init__(self, loss: PolicyLoss, level: Literal["token", "sequence"] = "token",
                 mode: Literal["truncate", "mask"] = "truncate", cap: float = 2.0, lower: float = 0.0,
                 sequence_mask: Literal["none", "any", "geometric"] = "none",
                 sequence_bounds: tuple[float, float] | None = None):
        problems = _bound_problems(level, mode, cap, lower, sequence_mask, sequence_bounds)
        if problems:
            raise ValueError("RolloutCorrection: " + "; ".join(problems))
        self.loss, self.level, self.mode, self.cap = loss, level, mode, cap
        self.lower, self.sequence_mask = lower, sequence_mask
        self.sequence_bounds = tuple(sequence_bounds) if sequence_bounds is not None else None

    @property
    def needs_reference(self) -> bool:
        return self.loss.needs_reference

    def set_step(self, global_step: int) -> None:
        self.loss.set_step(global_step)

    def __call__(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        ref_logprobs: Tensor | None = None,
        entropy: Tensor | None = None,
        normaliser: "Normaliser | None" = None,
        batch: "RolloutBatch | None" = None,
    ) -> LossOutput:
        """Shapes: logprobs, old_logprobs, mask (B, T); advantages (B,) or (B, T)."""
        behaviour = batch.behaviour_logprobs if batch is not None else None
        if behaviour is None:
            raise ValueError(
                "RolloutCorrection needs the sampler's log-probs (batch.behaviour_logprobs); set "
                "model.sampling.logprobs: true so the rollout backend returns them"
            )
        if behaviour.shape != logprobs.shape:
            raise ValueError(f"batch.behaviour_logprobs {tuple(behaviour.shape)} must match logprobs {tuple(logprobs.shape)} (B, T)")
        w, capped = importance_weights(old_logprobs, behaviour.to(logprobs.device), mask,
                                       level=self.level, mode=self.mode, cap=self.cap, lower=self.lower,
                                       sequence_mask=self.sequence_mask, sequence_bounds=self.sequence_bounds)  # (B, T) each
        A = advantages[:, None] if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
        out = self.loss(logprobs, old_logprobs, A * w, mask, ref_logprobs=ref_logprobs, entropy=entropy,
                        normaliser=normaliser, batch=batch)
        n = normaliser.num_tokens if normaliser is not None else mask.sum().clamp(min=1).float()
        diff = torch.where(mask, (old_logprobs - behaviour.to(logprobs.device)).abs(), torch.zeros_like(logprobs))
        metrics = dict(out.metrics)
        metrics["is_ratio_mean"] = masked_sum(w, mask).detach() / n  # sums over micro-batches to the batch mean
        metrics["is_ratio_capped_frac"] = masked_sum(capped.float(), mask).detach() / n
        metrics["is_ratio_masked_frac"] = masked_sum((w == 0).float(), mask).detach() / n  # w = e^(≥ −20) > 0 unless masked
        metrics["is_logp_diff"] = masked_sum(diff, mask).detach() / n
        return LossOutput(loss=out.loss, metrics=metrics)
