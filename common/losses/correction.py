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
    w̃ = min(w, C)                                          mode "truncate" (TIS)
    w̃ = w · 1[w ≤ C]                                       mode "mask"     (MIS)
    c'_it = w̃_it · c_it                                    c = the wrapped loss's per-token surrogate

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
) -> tuple[Tensor, Tensor]:
    """Capped importance weights π_old / μ of the sampled tokens (see the module docstring).

    Shapes: old_logprobs, behaviour_logprobs, mask (B, T) -> (weights (B, T) float, capped (B, T) bool); both
    are 0/False off the mask. ``capped`` marks the positions whose raw weight was above ``cap`` (truncated or
    masked). A sequence with no valid token gets no weight (zeros), never NaN.
    """
    check_token_shapes(old_logprobs, behaviour_logprobs, mask)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (B, T), got {mask.dtype}")
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    if mode not in ("truncate", "mask"):
        raise ValueError(f"mode must be 'truncate' or 'mask', got {mode!r}")
    if not cap > 0:
        raise ValueError(f"cap must be > 0 (the largest weight kept, C), got {cap}")
    log_w = torch.where(mask, old_logprobs - behaviour_logprobs, torch.zeros_like(old_logprobs))  # (B, T)
    if level == "sequence":
        log_w = masked_sum(log_w, mask, dim=1)[:, None].expand_as(log_w)  # (B, T): Σ_t, the same for every t
    w = torch.exp(log_w.detach().clamp(-_MAX_LOG_WEIGHT, _MAX_LOG_WEIGHT))  # (B, T)
    capped = (w > cap) & mask
    w = w.clamp(max=cap) if mode == "truncate" else w.masked_fill(capped, 0.0)
    return w.masked_fill(~mask, 0.0), capped


class RolloutCorrection(PolicyLoss):
    """Wrap a policy loss with TIS/MIS importance weights between the trainer's π_old and the sampler's μ.

    Reads ``batch.behaviour_logprobs`` (set ``sampling.logprobs: true`` so the rollout backend returns them) and
    the ``old_logprobs`` the update loop passes (the trainer's log-probs before this update). Logs
    ``is_ratio_mean`` (mean w̃ over valid tokens), ``is_ratio_capped_frac`` (tokens whose w exceeded the cap) and
    ``is_logp_diff`` (mean |ℓ^old − ℓ^μ|, the mismatch itself), as ``train/is_ratio_*`` through the module.

    Args:
        loss: the wrapped policy loss (e.g. ``ClippedPolicyLoss``); its surrogate must be positively
            homogeneous in the advantage (see the module docstring).
        level: "token" (a weight per token) or "sequence" (the product of a sequence's token ratios).
        mode: "truncate" (TIS: min(w, C)) or "mask" (MIS: w where w ≤ C, else 0).
        cap: C. TRL's default is 2.0 (token) / 3.0; the TIS blog uses 2.
    """

    def __init__(self, loss: PolicyLoss, level: Literal["token", "sequence"] = "token",
                 mode: Literal["truncate", "mask"] = "truncate", cap: float = 2.0):
        problems = []
        if level not in ("token", "sequence"):
            problems.append(f"level must be 'token' or 'sequence', got {level!r}")
        if mode not in ("truncate", "mask"):
            problems.append(f"mode must be 'truncate' or 'mask', got {mode!r}")
        if not cap > 0:
            problems.append(f"cap must be > 0, got {cap}")
        if problems:
            raise ValueError("RolloutCorrection: " + "; ".join(problems))
        self.loss, self.level, self.mode, self.cap = loss, level, mode, cap

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
                                       level=self.level, mode=self.mode, cap=self.cap)  # (B, T) each
        A = advantages[:, None] if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
        out = self.loss(logprobs, old_logprobs, A * w, mask, ref_logprobs=ref_logprobs, entropy=entropy,
                        normaliser=normaliser, batch=batch)
        n = normaliser.num_tokens if normaliser is not None else mask.sum().clamp(min=1).float()
        diff = torch.where(mask, (old_logprobs - behaviour.to(logprobs.device)).abs(), torch.zeros_like(logprobs))
        metrics = dict(out.metrics)
        metrics["is_ratio_mean"] = masked_sum(w, mask).detach() / n  # sums over micro-batches to the batch mean
        metrics["is_ratio_capped_frac"] = masked_sum(capped.float(), mask).detach() / n
        metrics["is_logp_diff"] = masked_sum(diff, mask).detach() / n
        return LossOutput(loss=out.loss, metrics=metrics)
