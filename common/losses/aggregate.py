"""Loss aggregation over tokens and sequences, independent of how a batch is split into micro-batches.

A per-token loss ``ℓ (B, T)`` becomes a scalar in one of four ways (mask ``m (B, T)``, ``L_i = Σ_t m_it``):

    token_mean               Σ_{i,t} m ℓ / Σ_{i,t} m                       DAPO (arXiv 2503.14476, eq. 8)
    seq_mean_token_mean      (1/B') Σ_i (1/L_i) Σ_t m ℓ                   GRPO (arXiv 2402.03300, eq. 3)
    seq_mean_token_sum       (1/B') Σ_i Σ_t m ℓ
    seq_mean_token_sum_norm  (1/B') Σ_i (1/T_max) Σ_t m ℓ                 Dr.GRPO (arXiv 2503.20783, eq. 3)

``B'`` counts sequences with at least one valid token (an empty completion is excluded, never divides by 0);
``T_max`` is the generation budget, a constant of the run. The denominators come from a
:class:`Normaliser` computed once over the whole optimiser batch, so summing the micro-batch losses gives
the same value and gradient as one pass over the full batch (the gradient-accumulation bug users of TRL and
verl hit when every micro-batch divides by its own token count).

Under data parallelism the counts are summed over ranks (``Normaliser.of(..., all_reduce=)``) and divided by the
number of ranks: every rank divides its own sum by its *share* ``N_global / W`` of the global count, so the mean
over ranks that DDP takes of the gradients, ``(1/W) Σ_r ∇(Σ_r-local / (N/W)) = ∇(Σ_global / N)``, is exactly the
gradient of one process on the global minibatch, for every mode. Metrics divided by the normaliser are the same
shares: their mean over ranks is the global value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from common.ops import masked_sum

Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
AGGREGATIONS: tuple[str, ...] = Aggregation.__args__


@dataclass(frozen=True)
class Normaliser:
    """Denominators of an optimiser batch. Build it with :meth:`of` on the full batch's mask.

    On one process the counts of the batch; under data parallelism this rank's share of the global counts
    (global count / number of ranks, module docstring)."""

    num_tokens: Tensor  # () Σ m over the optimiser batch (/ W)
    num_sequences: Tensor  # () sequences with L_i > 0 (/ W)
    max_len: int  # T_max, the generation budget

    @classmethod
    def of(cls, mask: Tensor, max_len: int | None = None, all_reduce: Callable[[Tensor], Tensor] | None = None) -> "Normaliser":
        """Counts of ``mask (B, T)``; with ``all_reduce`` (the sum over data-parallel ranks, a collective every rank
        calls) the global counts divided by the number of ranks."""
        if mask.dim() != 2:
            raise ValueError(f"mask must be (B, T), got shape {tuple(mask.shape)}")
        # (3,) tokens, non-empty sequences, ranks (each rank counts itself once)
        counts = torch.stack([mask.sum().float(), (mask.sum(1) > 0).sum().float(), torch.ones((), device=mask.device)])
        if all_reduce is not None:
            counts = all_reduce(counts)
        return cls(
            num_tokens=counts[0].clamp(min=1) / counts[2],
            num_sequences=counts[1].clamp(min=1) / counts[2],
            max_len=int(max_len if max_len is not None else mask.shape[1]),
        )


def aggregate(per_token: Tensor, mask: Tensor, mode: Aggregation, normaliser: Normaliser | None = None) -> Tensor:
    """Reduce ``per_token (B, T)`` to a scalar by ``mode`` (see the module docstring).

    ``normaliser`` holds the denominators of the full optimiser batch; None means "this batch is the whole
    optimiser batch". Shapes: per_token (B, T), mask (B, T) -> ().
    """
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must have the same shape (B, T)")
    norm = normaliser if normaliser is not None else Normaliser.of(mask)
    if mode == "token_mean":
        return masked_sum(per_token, mask) / norm.num_tokens
    seq_sum = masked_sum(per_token, mask, dim=1)  # (B,)
    if mode == "seq_mean_token_mean":
        seq_sum = seq_sum / mask.sum(1).clamp(min=1)
    elif mode == "seq_mean_token_sum_norm":
        seq_sum = seq_sum / norm.max_len
    elif mode != "seq_mean_token_sum":
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")
    return seq_sum.sum() / norm.num_sequences
