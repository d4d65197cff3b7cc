"""The clipped surrogate restricted to low-probability tokens: SPO's probability mask (Segment Policy Optimization,
arXiv 2505.23564; authors' ``use_prob_mask``):

    m'_it = m_it · 1[exp(ℓ^old_it) < τ]                          (τ = 0.9)
    loss  = Σ_{i,t} m'_it · ℓ^clip_it / Σ_{i,t} m'_it              token-mean over m'

Tokens the old policy already samples with p ≥ τ get no gradient and do not count in the denominator. The
denominator of the optimiser minibatch is estimated from the micro-batch's share of kept tokens (exact when the
micro-batch is the whole minibatch, i.e. ``micro_batch_size`` unset).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from common.losses.aggregate import Normaliser
from common.losses.base import LossOutput, check_token_shapes
from common.losses.kl import KLEstimator
from common.losses.ppo_clip import ClippedPolicyLoss

if TYPE_CHECKING:
    from common.batch import RolloutBatch


class ProbabilityMaskLoss(ClippedPolicyLoss):
    """ClippedPolicyLoss (token-mean) on the tokens whose old probability is below ``threshold``.

    Args:
        threshold: τ (SPO 0.9); 1.0 keeps every token with p < 1.
        eps_low, eps_high, dual_clip, beta, kl_estimator, entropy_coef: as in ClippedPolicyLoss.
    """

    def __init__(self, threshold: float = 0.9, eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: float | None = None,
                 beta: float = 0.0, kl_estimator: KLEstimator = "k3", entropy_coef: float = 0.0):
        if not 0 < threshold <= 1:
            raise ValueError(f"ProbabilityMaskLoss: threshold must be in (0, 1], got {threshold}")
        super().__init__(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, aggregation="token_mean", beta=beta,
                         kl_estimator=kl_estimator, entropy_coef=entropy_coef)
        self.threshold = threshold

    def __call__(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                 ref_logprobs: Tensor | None = None, entropy: Tensor | None = None,
                 normaliser: Normaliser | None = None, batch: "RolloutBatch | None" = None) -> LossOutput:
        check_token_shapes(logprobs, old_logprobs, mask)
        keep = mask & (old_logprobs.detach().exp() < self.threshold)  # (B, T) m'
        norm = normaliser if normaliser is not None else Normaliser.of(mask)
        share = keep.sum() / mask.sum().clamp(min=1)  # () kept share of this micro-batch's tokens
        kept_norm = Normaliser(num_tokens=(norm.num_tokens * share).clamp(min=1), num_sequences=norm.num_sequences,
                               max_len=norm.max_len)
        out = super().__call__(logprobs, old_logprobs, advantages, keep, ref_logprobs=ref_logprobs, entropy=entropy,
                               normaliser=kept_norm, batch=batch)
        out.metrics["prob_mask_frac"] = keep.sum().detach() / norm.num_tokens  # summed over micro-batches
        return out
