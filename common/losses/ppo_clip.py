"""The clipped policy-gradient surrogate of the GRPO family, in one general form.

    ρ_it = exp(ℓ_it − ℓ^old_it)                                          token-level ratio (PPO, GRPO, DAPO)
    ρ_it = exp((1/L_i) Σ_t m_it (ℓ_it − ℓ^old_it))  for every t           sequence-level ratio (GSPO, arXiv 2507.18071 eq. 7)
    c_it = max(−A_it ρ_it, −A_it clip(ρ_it, 1 − ε_low, 1 + ε_high))      PPO (arXiv 1707.06347 eq. 7)
    c_it = min(c_it, −c·A_it)   where A_it < 0                          dual-clip (Ye et al. 2020, arXiv 1912.09729 eq. 5)
    loss = agg(c) + β·agg(KL(π‖π_ref)) − α·agg(H)

ε_low and ε_high may differ per token (HAPO's entropy-adaptive ranges), and the ratio may be one per row
(HölderPO's power mean R_i, GTO's geometric mean over a branch): one clip for all of them.

Special cases are settings: GRPO is ε_low = ε_high = 0.2 with ``seq_mean_token_mean``; DAPO's clip-higher is
ε_low = 0.2, ε_high = 0.28 with ``token_mean``; Dr.GRPO is ``seq_mean_token_sum_norm`` with β = 0; GSPO is
``ratio_level="sequence"`` with ε = 3e-4 / 4e-4.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from common.losses.aggregate import AGGREGATIONS, Aggregation, Normaliser, aggregate
from common.losses.base import LossOutput, PolicyLoss
from common.losses.kl import KLEstimator, kl_estimate
from common.ops import MAX_LOG_RATIO, masked_sum

if TYPE_CHECKING:
    from common.batch import RolloutBatch


def clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float | Tensor = 0.2,
    eps_high: float | Tensor = 0.2,
    dual_clip: float | None = None,
    ratio_level: Literal["token", "sequence"] = "token",
    max_log_ratio: float = MAX_LOG_RATIO,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-action clipped surrogate loss (to minimise) and its diagnostics: the one clip and dual-clip of the
    library (HAPO's per-token ε, HölderPO's and GTO's per-sequence ratios call it too).

    Shapes: logprobs, old_logprobs, mask (B, T) token actions, or (B,) one action per row (a sequence-level
    log-ratio the caller formed: HölderPO's log R_i, GTO's per-token geometric mean); advantages (B,) or (B, T);
    eps_low, eps_high floats or tensors broadcastable to the ratio (per-token clip ranges, HAPO).
    log ρ is clamped to ±``max_log_ratio`` before exp() (``common.ops.MAX_LOG_RATIO``).
    Returns ``(loss, ratio, clipped bool)`` shaped like ``logprobs``; positions outside ``mask`` are 0/False.
    """
    if logprobs.dim() not in (1, 2) or logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and mask "
            f"{tuple(mask.shape)} must all be (B, T) (or all (B,), one action per row)"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (B, T), got {mask.dtype}")
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask)):
        if t.device != logprobs.device:
            raise ValueError(f"{name} is on {t.device} but logprobs is on {logprobs.device}; move both to one device")
    B, T = logprobs.shape[0], (logprobs.shape[1] if logprobs.dim() == 2 else 1)
    if advantages.dim() not in (1, 2) or advantages.shape[0] != B or advantages.shape[1:] not in ((), (1,), (T,)):
        raise ValueError(f"advantages must be (B,) or (B, T) for logprobs of shape {tuple(logprobs.shape)}, "
                         f"got {tuple(advantages.shape)}")
    if logprobs.dim() == 1:
        advantages = advantages.reshape(B)  # (B,) one action per row
    elif advantages.dim() == 1:
        advantages = advantages[:, None]  # (B, 1) broadcast over T
    log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))  # (B, T)
    if ratio_level == "sequence" and logprobs.dim() == 2:
        seq = masked_sum(log_ratio, mask, dim=1) / mask.sum(1).clamp(min=1)  # (B,)
        log_ratio = seq[:, None].expand_as(log_ratio)
    elif ratio_level not in ("token", "sequence"):
        raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
    ratio = torch.exp(log_ratio.clamp(-max_log_ratio, max_log_ratio))  # (B, T)
    unclipped = -advantages * ratio
    low, high = 1.0 - eps_low, 1.0 + eps_high  # floats, or per-token tensors
    if torch.is_tensor(low) or torch.is_tensor(high):
        low, high = (torch.as_tensor(b, dtype=ratio.dtype, device=ratio.device) for b in (low, high))
    clipped = -advantages * torch.clamp(ratio, low, high)
    loss = torch.maximum(unclipped, clipped)  # (B, T)
    was_clipped = clipped > unclipped
    if dual_clip is not None:
        bound = -dual_clip * advantages
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(dual, bound.expand_as(loss), loss)
        was_clipped = was_clipped | dual
    return loss.masked_fill(~mask, 0.0), ratio.masked_fill(~mask, 0.0), was_clipped & mask


class ClippedPolicyLoss(PolicyLoss):
    """Clipped surrogate + KL penalty + entropy bonus, aggregated independently of the micro-batch split.

    Args:
        eps_low: lower clip range, ρ >= 1 − eps_low (PPO/GRPO 0.2).
        eps_high: upper clip range, ρ <= 1 + eps_high (0.2; DAPO's clip-higher uses 0.28).
        dual_clip: the constant c > 1 of dual-clip PPO, bounding the loss of negative-advantage tokens; None = off.
        ratio_level: "token" (PPO/GRPO) or "sequence" (GSPO's length-normalised sequence ratio).
        aggregation: "token_mean", "seq_mean_token_mean" (GRPO), "seq_mean_token_sum" or
            "seq_mean_token_sum_norm" (Dr.GRPO's constant normaliser T_max).
        beta: KL coefficient β of the penalty in the loss (GRPO 0.04; 0 turns the reference model off).
            For KL in the reward instead, set ``kl_in_reward`` on the module and beta here to 0.
        kl_estimator: "k1", "k2" or "k3" (GRPO).
        entropy_coef: α of the entropy bonus −α·H (0 = off).
    """

    def __init__(
        self,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        dual_clip: float | None = None,
        ratio_level: Literal["token", "sequence"] = "token",
        aggregation: Aggregation = "seq_mean_token_mean",
        beta: float = 0.0,
        kl_estimator: KLEstimator = "k3",
        entropy_coef: float = 0.0,
    ):
        problems = []
        if not 0 <= eps_low < 1:
            problems.append(f"eps_low must be in [0, 1), got {eps_low}")
        if eps_high < 0:
            problems.append(f"eps_high must be >= 0, got {eps_high}")
        if dual_clip is not None and dual_clip <= 1:
            problems.append(f"dual_clip must be > 1 (or None), got {dual_clip}")
        if ratio_level not in ("token", "sequence"):
            problems.append(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
        if aggregation not in AGGREGATIONS:
            problems.append(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if beta < 0:
            problems.append(f"beta must be >= 0, got {beta}")
        if kl_estimator not in ("k1", "k2", "k3"):
            problems.append(f"kl_estimator must be 'k1', 'k2' or 'k3', got {kl_estimator!r}")
        if entropy_coef < 0:
            problems.append(f"entropy_coef must be >= 0 (it weights a bonus), got {entropy_coef}")
        if problems:
            raise ValueError("ClippedPolicyLoss: " + "; ".join(problems))
        self.eps_low, self.eps_high, self.dual_clip, self.ratio_level = eps_low, eps_high, dual_clip, ratio_level
        self.aggregation, self.beta, self.kl_estimator, self.entropy_coef = aggregation, beta, kl_estimator, entropy_coef

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0

    def __call__(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        ref_logprobs: Tensor | None = None,
        entropy: Tensor | None = None,
        normaliser: Normaliser | None = None,
        batch: "RolloutBatch | None" = None,
    ) -> LossOutput:
        """Shapes: logprobs, old_logprobs, mask, ref_logprobs, entropy (B, T); advantages (B,) or (B, T)."""
        if entropy is not None and (entropy.shape != logprobs.shape or entropy.device != logprobs.device):
            raise ValueError(
                f"entropy must be like logprobs, {tuple(logprobs.shape)} on {logprobs.device}, "
                f"got {tuple(entropy.shape)} on {entropy.device}"
            )
        norm = normaliser if normaliser is not None else Normaliser.of(mask)
        pg, ratio, clipped = clipped_surrogate(
            logprobs, old_logprobs, advantages, mask,
            eps_low=self.eps_low, eps_high=self.eps_high, dual_clip=self.dual_clip, ratio_level=self.ratio_level,
        )  # (B, T) each
        loss = aggregate(pg, mask, self.aggregation, norm)
        metrics = {
            "pg_loss": loss.detach(),
            "clip_frac": masked_sum(clipped.float(), mask).detach() / norm.num_tokens,
            "ratio": masked_sum(ratio, mask).detach() / norm.num_tokens,
        }
        if self.beta > 0:
            if ref_logprobs is None:
                raise ValueError("ref_logprobs is required when beta > 0 (the KL penalty needs the reference policy)")
            kl = kl_estimate(logprobs, ref_logprobs, self.kl_estimator)  # (B, T)
            loss = loss + self.beta * aggregate(kl, mask, self.aggregation, norm)
            metrics["kl"] = masked_sum(kl, mask).detach() / norm.num_tokens
        if entropy is not None:
            if self.entropy_coef:
                loss = loss - self.entropy_coef * aggregate(entropy, mask, self.aggregation, norm)
            metrics["entropy"] = masked_sum(entropy, mask).detach() / norm.num_tokens
        return LossOutput(loss=loss, metrics=metrics)
