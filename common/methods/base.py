"""Method: a composable part of an RL method, with hooks at the steps of the update loop (DESIGN.md).

A method is listed in YAML (``model.init_args.methods: [...]``) and combines with others. It never subclasses
the module, never reaches back into it, and keeps its state in declared buffers, submodules or extra state
(so it is in the Lightning checkpoint). The loop hands each hook what it needs, explicitly:

    setup(loop)                          once, before training: check the estimator / loss / policy it pairs with
    rollout(loop, prompts, n)            replace the training rollout (hints, segment trees, offline rows); None = default
    after_rollout(loop, batch)           step 1 -> 2: add rows or declared fields (in-flight responses, phase starts)
    after_score(loop, batch)             step 2 -> 3: reshape rewards, add fields the estimator reads (values, teacher)
    loss_inputs(loop, micro, out, kw)    step 6: extra keyword inputs of the policy loss from the policy forward
    extra_loss(loop, micro, out, norm)   step 6: terms added to the micro-batch loss (a critic's value loss)
    after_update(loop, batch)            after the optimiser steps: EMA teachers, trackers; returns metrics

Class attributes declare what the method exchanges through the batch (``requires``, ``provides``: RolloutBatch
field names, checked once at start-up) and what it needs from the loop (``needs_hidden``: the update's policy
forward returns hidden states; ``needs_old_logprobs``: π_old is computed even with one optimiser step per rollout).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from common.batch import RolloutBatch
from common.losses.aggregate import Normaliser
from common.losses.base import LossOutput
from common.policies.base import PolicyOutput

if TYPE_CHECKING:
    from common.loop import Loop


class Method(nn.Module):
    """Base class of method parts: every hook defaults to "nothing to do" (see the module docstring)."""

    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    needs_hidden: ClassVar[bool] = False
    needs_old_logprobs: ClassVar[bool] = False

    def setup(self, loop: "Loop") -> None:
        """Check, once, that the loop's estimator, loss and policy are ones this method works with."""

    def rollout(self, loop: "Loop", prompts: Any, n: int) -> RolloutBatch | None:
        return None

    def after_rollout(self, loop: "Loop", batch: RolloutBatch) -> RolloutBatch:
        return batch

    def after_score(self, loop: "Loop", batch: RolloutBatch) -> RolloutBatch:
        return batch

    def loss_inputs(self, loop: "Loop", micro: RolloutBatch, out: PolicyOutput, inputs: dict[str, Any]) -> dict[str, Any]:
        return {}

    def extra_loss(self, loop: "Loop", micro: RolloutBatch, out: PolicyOutput, normaliser: Normaliser) -> LossOutput | None:
        return None

    def after_update(self, loop: "Loop", batch: RolloutBatch) -> dict[str, Tensor]:
        return {}

    def param_groups(self, lr: float) -> list[dict]:
        """Parameter groups of the method's own trainable parts (a critic head), added to the optimiser."""
        return []
