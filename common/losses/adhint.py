"""ADHint's consistency-based gradient modulation (CGM) on hint tokens (arXiv 2512.13095; the formula is the spec's
PROPOSAL, shared/methods/text.md §16 — the paper's is unverified). The hint schedule, the difficulty-posterior
advantages and the selective masking are in ``common/advantages/adhint.py``.

    w_t = exp(−|log H_t − log H̄_cont|)  on hint tokens,  1 elsewhere
    H_t: the policy's entropy at hint token t; H̄_cont: mean entropy over the row's own sampled continuation.

Hint tokens the policy finds as (un)certain as its own continuation keep their full gradient; inconsistent ones
(far more or less certain) are down-weighted. The weight multiplies the token's advantage, which for a positive
factor is the same as multiplying its clipped loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from common.advantages.adhint import hint_lengths
from common.losses.aggregate import Normaliser
from common.losses.base import LossOutput
from common.losses.ppo_clip import ClippedPolicyLoss

if TYPE_CHECKING:
    from common.batch import RolloutBatch


def consistency_weights(entropy: Tensor, hint_mask: Tensor, mask: Tensor, *, eps: float = 1e-6) -> Tensor:
    """CGM (the spec's PROPOSAL; the paper's formula is unverified): on hint tokens
    w_t = exp(−|log H_t − log H̄_cont|), H̄_cont the mean entropy of the row's own (sampled) continuation; 1 elsewhere
    and on rows without a continuation. Shapes: entropy, hint_mask, mask (B, T) -> (B, T), detached, in (0, 1]."""
    if entropy.shape != hint_mask.shape or entropy.shape != mask.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)}, hint_mask {tuple(hint_mask.shape)} and mask "
                         f"{tuple(mask.shape)} must all be (B, T)")
    H = entropy.detach().clamp(min=eps)  # (B, T)
    cont = mask & ~hint_mask  # (B, T) the sampled continuation
    n_cont = cont.sum(1)  # (B,)
    H_cont = torch.where(cont, H, torch.zeros_like(H)).sum(1) / n_cont.clamp(min=1)  # (B,)
    w = torch.exp(-(H.log() - H_cont.clamp(min=eps).log()[:, None]).abs())  # (B, T)
    apply = hint_mask & mask & (n_cont > 0)[:, None]
    return torch.where(apply, w, torch.ones_like(w))


class ADHintLoss(ClippedPolicyLoss):
    """The clipped loss with ADHint's consistency-based gradient modulation (CGM, proposal; see
    :func:`consistency_weights`): hint-token advantages are multiplied by w_t ∈ (0, 1] (a positive factor on A is a
    factor on that token's clipped loss). Hint tokens are the first ``batch.hint_len`` (B,) of each completion.

    Args:
        **kwargs: everything of :class:`common.losses.ppo_clip.ClippedPolicyLoss`.
    """

    requires = ("hint_len",)

    def __call__(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                 ref_logprobs: Tensor | None = None, entropy: Tensor | None = None,
                 normaliser: Normaliser | None = None, batch: "RolloutBatch | None" = None) -> LossOutput:
        if entropy is None or batch is None:
            raise ValueError("ADHintLoss needs entropy (B, T) and batch= (for batch.hint_len) to modulate hints")
        T = mask.shape[1]
        k = hint_lengths(batch, "ADHintLoss").to(mask.device)  # (B,)
        hint_mask = torch.arange(T, device=mask.device)[None, :] < k[:, None]  # (B, T)
        w = consistency_weights(entropy, hint_mask, mask)  # (B, T)
        A = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(w)  # (B, T)
        out = super().__call__(logprobs, old_logprobs, A * w, mask, ref_logprobs=ref_logprobs, entropy=entropy,
                               normaliser=normaliser, batch=batch)
        out.metrics["hint_weight"] = torch.where(hint_mask & mask, w, torch.zeros_like(w)).sum() / (hint_mask & mask).sum().clamp(min=1)
        return out
