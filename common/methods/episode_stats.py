"""EpisodeStats: per-step statistics of a multi-turn agent's episodes (common/policies/agent.py), logged as metrics.

The agent records in each row's sample why its episode ended (``end_reason``, one of
``common.rollout.env.END_REASONS``) and how many turns it took (``turns``); this part turns them into the fraction
of the step's episodes per reason (``train/end/<reason>``) and the mean number of turns (``train/episode_turns``),
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

    requires = ("episode_ids",)  # rows are episodes of a multi-turn agent

    def after_update(self, loop, batch: RolloutBatch) -> dict[str, Tensor]:
        if not batch.samples:
            return {}
        reasons = [s.get("end_reason") for s in batch.samples]
        n = len(reasons)
        out = {f"end/{r}": torch.tensor(sum(x == r for x in reasons) / n) for r in END_REASONS}
        out["episode_turns"] = torch.tensor([float(s.get("turns", 0)) for s in batch.samples]).mean()
        return out


__all__ = ["EpisodeStats"]
