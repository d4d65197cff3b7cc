"""EpisodeStats: per-step statistics of a multi-turn agent's episodes (common/policies/agent.py), logged as metrics.

The agent records why each episode ended (``RolloutBatch.end_reason``, an index into
``common.rollout.env.END_REASONS``) and how many turns it took (``num_turns``); this part turns them into the fraction
and the count of the trained episodes per reason (``train/end/<reason>``, ``train/end_count/<reason>``) and the mean
number of turns (``train/episode_turns``), so that timeouts, parse errors, environment errors and overflows are
counted, never silent. With per-turn columns it also logs the fraction of turns whose action did not parse
(``train/invalid_turns``), the mean anchor-state group size of GiGPO (turns of one task sharing a state key;
agentic.md §14.4: ≈ 1 means the keys are not history-free), and, where the agent re-renders its histories
(``EpisodeLimits.observation_role``), the re-tokenisation drift per turn index (``train/drift/turn_<t>``: the fraction
of the turns at index t whose re-rendered history differs from the sampled tokens; ``train/drift``: over all turns).
Episodes are counted once in either layout (layout A rows are weighted 1 / turns of their episode). It changes
nothing in the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.batch import RolloutBatch
from common.methods.base import Method
from common.rollout.env import END_REASONS


class EpisodeStats(Method):
    """Log the end reasons, turn counts, invalid turns, anchor-group sizes and drift of the trained episodes
    (module docstring).

    Args:
        drift_turns: turn indices 0..drift_turns-1 get their own ``drift/turn_<t>`` metric.
    """

    requires = ("end_reason", "num_turns")  # provided by MultiTurnAgentPolicy

    def __init__(self, drift_turns: int = 8):
        super().__init__()
        if not isinstance(drift_turns, int) or drift_turns < 0:
            raise ValueError(f"drift_turns must be a non-negative integer, got {drift_turns!r}")
        self.drift_turns = drift_turns

    def after_update(self, loop, batch: RolloutBatch) -> dict[str, Tensor]:
        if batch.batch_size == 0:
            return {}
        # one weight per episode: a layout-A row is one of its episode's turns
        weight = torch.ones(batch.batch_size, device=batch.end_reason.device)  # (B,)
        if batch.turn_mask is not None and batch.turn_mask.shape[1] == 1 and batch.num_turns is not None:
            weight = 1.0 / batch.num_turns.clamp(min=1).float()
        episodes = weight.sum()
        counts = torch.zeros(len(END_REASONS), device=weight.device).index_add_(0, batch.end_reason, weight)  # (R,)
        out = {f"end/{r}": counts[i] / episodes for i, r in enumerate(END_REASONS)}
        out.update({f"end_count/{r}": counts[i].round() for i, r in enumerate(END_REASONS)})
        out["episode_turns"] = (batch.num_turns.float() * weight).sum() / episodes
        if batch.turn_mask is None:
            return out
        m = batch.turn_mask  # (B, K)
        turns = m.sum().clamp(min=1)
        if batch.turn_valid is not None:
            out["invalid_turns"] = (m & ~batch.turn_valid).sum() / turns
        if batch.turn_keys is not None:  # mean size of the (group, state key) anchor group a turn falls in
            keyed = m & (batch.turn_keys >= 0)  # (B, K)
            g = batch.group_ids[:, None].expand_as(m)[keyed]  # (N,)
            _, inverse, sizes = torch.unique(torch.stack([g, batch.turn_keys[keyed]]), dim=1, return_inverse=True,
                                             return_counts=True)
            out["anchor_group_size"] = sizes[inverse].float().mean() if g.numel() else torch.zeros(())
        if batch.turn_drift is not None:
            out["drift"] = (m & batch.turn_drift).sum() / turns
            t = batch.turn_ids[:, None] + torch.arange(m.shape[1], device=m.device)  # (B, K) turn index of each column
            for k in range(self.drift_turns):  # ok: a fixed number of metrics
                at = m & (t == k)
                if bool(at.any()):
                    out[f"drift/turn_{k}"] = (at & batch.turn_drift).sum() / at.sum()
        return out


__all__ = ["EpisodeStats"]
