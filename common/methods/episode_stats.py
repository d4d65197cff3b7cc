"""EpisodeStats: per-step statistics of a multi-turn agent's episodes (common/policies/agent.py), logged as metrics.

The agent records why each episode ended (``RolloutBatch.end_reason``, an index into
``common.rollout.env.END_REASONS``) and how many turns it took (``num_turns``); this part turns them into the fraction
of the trained episodes per reason (``train/end/<reason>``) and the mean number of turns (``train/episode_turns``),
so that timeouts, environment errors and overflows are counted, never silent. It changes nothing in the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.batch import RolloutBatch
from common.methods.base import Method
from common.rollout.env import END_REASONS


class EpisodeStats(Method):
    """Log the end reasons and turn counts of the trained episodes (module docstring)."""

    requires = ("end_reason", "num_turns")  # provided by MultiTurnAgentPolicy

    def after_update(self, loop, batch: RolloutBatch) -> dict[str, Tensor]:
        if batch.batch_size == 0:
            return {}
        counts = torch.bincount(batch.end_reason, minlength=len(END_REASONS)).float()  # (R,)
        out = {f"end/{r}": counts[i] / batch.batch_size for i, r in enumerate(END_REASONS)}
        out["episode_turns"] = batch.num_turns.float().mean()
        return out


__all__ = ["EpisodeStats"]
