"""The protocol every policy loss implements, and its output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from common.batch import RolloutBatch
    from common.losses.aggregate import Normaliser


@dataclass
class LossOutput:
    loss: Tensor  # () the scalar to backpropagate
    metrics: dict[str, Tensor] = field(default_factory=dict)  # detached, already divided by the global normaliser


def check_token_shapes(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> None:
    """Raise ``ValueError`` unless logprobs, old_logprobs and mask are all the same (B, T)."""
    if logprobs.dim() != 2 or logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} must all be (B, T)")


class PolicyLoss:
    """Base class of policy losses, called once per micro-batch by the update loop::

        loss(logprobs, old_logprobs, advantages, mask, ref_logprobs=..., entropy=..., normaliser=..., batch=...)

    Shapes: logprobs, old_logprobs, mask, ref_logprobs, entropy (B, T); advantages (B,) or (B, T). ``normaliser``
    holds the denominators of the whole optimiser minibatch (sum the micro-batch losses, never average them);
    ``batch`` is the micro-batch itself, for losses that need rewards, group ids or lengths (DRPO).
    """

    @property
    def needs_reference(self) -> bool:
        """True if the loss reads ``ref_logprobs`` (the module then computes them)."""
        return False

    def set_step(self, global_step: int) -> None:
        """Called before each training step with the optimiser step count (schedules such as HölderPO's p)."""

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
        raise NotImplementedError
