"""Canaries: cheap run-time checks that warn (and log a metric) when training has silently become a no-op.

Opt-in, listed under ``methods:`` in YAML like any method part (it changes nothing in the batch or the loss)::

    methods:
      - class_path: common.methods.canaries.Canaries
        init_args: {equal_reward_steps: 5}

Checks, each a ``CanaryWarning`` (once per streak) and a metric logged every step:

- every reward of a sampling round equal (max = min over all rows, after the domain's score) for
  ``equal_reward_steps`` rounds in a row: group-relative advantages are all 0, so nothing is learned (a broken
  reward function, a verifier that never matches, a task far too hard or too easy). Metric
  ``train/canary/equal_reward_steps``: the current streak. A round is a step when ``max_generation_rounds`` = 1.
- the trainable-token fraction of the rows trained on is 0 (every completion empty, or every token masked out of the
  loss, e.g. environment-written): no token carries a gradient. Metric ``train/canary/trainable_token_frac``: loss
  tokens / (B x T) of the kept batch. (A step whose selector kept no row at all is logged by the loop as
  ``train/empty_steps``.)
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from common.batch import RolloutBatch
from common.methods.base import Method

if TYPE_CHECKING:
    from common.loop import Loop


class CanaryWarning(UserWarning):
    """Training has probably become a no-op (see common/methods/canaries.py)."""


class Canaries(Method):
    """Warn when rewards stop varying or no token is trainable (module docstring).

    Args:
        equal_reward_steps: N, consecutive rounds with every reward equal before warning (>= 1).
    """

    def __init__(self, equal_reward_steps: int = 5):
        super().__init__()
        if equal_reward_steps < 1:
            raise ValueError(f"Canaries: equal_reward_steps must be >= 1, got {equal_reward_steps}")
        self.equal_reward_steps = equal_reward_steps
        self.register_buffer("equal_streak", torch.zeros((), dtype=torch.long))  # checkpointed: a resume keeps counting

    def after_score(self, loop: "Loop", batch: RolloutBatch) -> RolloutBatch:
        r = batch.rewards  # (B,)
        equal = bool(r.numel() == 0 or r.max() == r.min())  # ok: one host sync per round, host-side check
        self.equal_streak.copy_(self.equal_streak + 1 if equal else torch.zeros_like(self.equal_streak))
        if int(self.equal_streak) == self.equal_reward_steps:
            value = float(r[0]) if r.numel() else float("nan")
            warnings.warn(f"Canaries: every reward was equal ({value:g}) for {self.equal_reward_steps} sampling rounds in "
                          "a row: group-relative advantages are all 0 and nothing is learned; check the reward "
                          "functions and the task's difficulty", CanaryWarning, stacklevel=2)
        return batch

    def after_update(self, loop: "Loop", batch: RolloutBatch) -> dict[str, Tensor]:
        mask = batch.loss_mask  # (B, T)
        frac = mask.float().mean() if mask.numel() else mask.new_zeros((), dtype=torch.float32)  # ()
        if not bool(frac > 0):  # ok: one host sync per step
            warnings.warn(f"Canaries: no trainable token in the {batch.batch_size} rows trained on (every completion "
                          "empty or masked out of the loss): the optimiser step changes nothing", CanaryWarning, stacklevel=2)
        return {"canary/equal_reward_steps": self.equal_streak.float(), "canary/trainable_token_frac": frac.detach()}
