"""The protocol every advantage estimator implements, and the input checks they share."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from common.batch import RolloutBatch


class AdvantageEstimator:
    """Base class: ``estimator(batch) -> advantages``, (B,) sequence-level or (B, T) token-level, or
    ``(advantages, keep)`` with ``keep (B,) bool`` when the method drops rows (MC-GRPO's pivots).

    Subclasses bind hyperparameters in a typed ``__init__`` (so YAML can name them by ``class_path``)
    and call a pure tensor function of the same family. Stateful estimators are ``nn.Module``s with buffers,
    so their state is in the Lightning checkpoint.

    ``min_group_size``: the smallest G for which the estimator can give a non-zero advantage. Group-relative
    estimators (GRPO, RLOO, ...) centre each reward on its group, so a group of one gives exactly 0; they
    declare 2, and the loop refuses a smaller ``group_size`` at start-up. Group-free estimators (SPO's tracker,
    EGAE, SPO-chain) keep 1.
    """

    min_group_size: int = 1

    def __call__(self, batch: RolloutBatch) -> Tensor | tuple[Tensor, Tensor]:
        raise NotImplementedError

    # The sum of a tensor over data-parallel ranks, set by the Loop when it has one (None: one process). Estimators
    # whose statistics span the batch reduce them with it, so that they are the global batch's (GRPO scale="batch").
    all_reduce: Callable[[Tensor], Tensor] | None = None


def check_rewards(rewards: Tensor, name: str = "rewards") -> None:
    """Raise ``ValueError`` unless ``rewards`` is a finite 1-D floating tensor (B,).

    NaN/inf rewards always raise here: what a failed reward becomes is decided earlier, by the reward policy.
    """
    if not torch.is_tensor(rewards) or rewards.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor (B,), got shape {tuple(getattr(rewards, 'shape', ()))}")
    if not rewards.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {rewards.dtype}")
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()):
        idx = bad.nonzero().flatten()[:5].tolist()  # ok: error path only
        raise ValueError(f"{name} must be finite, got NaN/inf at rows {idx}; set the reward failure policy instead")
