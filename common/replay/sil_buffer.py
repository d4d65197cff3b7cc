"""SPEAR's self-imitation buffer: the agent's own good episodes, their recalibration against a slowly moving
baseline, eviction by age (arXiv 2509.22601, §3.3; authors' code TencentYoutuResearch/SPEAR
``verl-agent/verl/trainer/ppo/ray_trainer_hybrid.py`` ``TrajectoryBufferBatch``); shared/methods/agentic.md §7 (b) 3-4.

    insertion    after each step τ: the rows whose mean token advantage is > 0, with their reward R, their tokens and
                 their behaviour log-probs (π_old at collection), tagged with τ
    eviction     rows with τ_latest − τ_entry > τ_tol are dropped, τ_tol = min(tolerate_steps, 10)
    baseline H   after each step the list of the step's group means (mean over the group's episodes of each
                 episode's mean turn reward; here the episode's reward) is appended; the oldest steps are popped
                 while H holds more than ``baseline_size`` group means
    replay       Â_u = R_u − P50(H) (no std normalisation); keep Â ≥ 0; a uniform subsample of 2^⌊log₂ n⌋ rows,
                 at most ``max_rows``; then the buffer is emptied

P50 is the linearly interpolated 50th percentile of every stored group mean (numpy's default). State (extra state,
in the checkpoint): the rows, their entry steps, and H.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from common.batch import RolloutBatch

_DROP = ("ref_logprobs", "values", "entropy")


class SelfImitationBuffer(torch.nn.Module):
    """SPEAR's replay buffer with baseline history (module docstring).

    Args:
        tolerate_steps: rows older than min(tolerate_steps, 10) steps are evicted (SPEAR's script 5).
        baseline_size: group means kept in the baseline history H (SPEAR 10240).
    """

    def __init__(self, tolerate_steps: int = 5, baseline_size: int = 10240):
        super().__init__()
        if tolerate_steps < 0 or baseline_size < 1:
            raise ValueError(f"SelfImitationBuffer: tolerate_steps must be >= 0 and baseline_size >= 1, got "
                             f"{tolerate_steps}, {baseline_size}")
        self.tolerance, self.baseline_size = min(tolerate_steps, 10), baseline_size
        self.rows: RolloutBatch | None = None
        self.entry: list[int] = []  # (N,) step each row was added at
        self.history: list[list[float]] = []  # H: one list of group means per step, oldest first

    def __len__(self) -> int:
        return len(self.entry)

    def add(self, rows: RolloutBatch, step: int) -> None:
        """Store ``rows`` (which must carry ``old_logprobs`` (B, T) and ``rewards``) tagged with ``step``."""
        if rows.batch_size == 0:
            return
        rows.require("SelfImitationBuffer.add", "old_logprobs", "rewards")
        rows = rows.replace(group_ids=torch.arange(rows.batch_size, device=rows.group_ids.device),
                            **{f: None for f in _DROP}).to("cpu")
        self.rows = rows if self.rows is None else RolloutBatch.cat([self.rows, rows])
        self.entry = self.entry + [int(step)] * rows.batch_size

    def evict(self, latest: int) -> int:
        """Drop rows with latest − entry > τ_tol; returns how many were dropped."""
        keep = [latest - e <= self.tolerance for e in self.entry]
        dropped = len(keep) - sum(keep)
        if dropped:
            self.entry = [e for e, k in zip(self.entry, keep) if k]
            self.rows = self.rows.select(torch.tensor(keep)) if self.entry else None
        return dropped

    def push_baseline(self, group_means: list[float]) -> None:
        """Append one step's group means; pop the oldest steps while H holds more than ``baseline_size``."""
        self.history.append([float(x) for x in group_means])
        while len(self.history) > 1 and sum(len(h) for h in self.history) > self.baseline_size:
            self.history.pop(0)

    def baseline(self) -> float:
        """P50 of every group mean in H (0 when H is empty)."""
        values = [x for h in self.history for x in h]
        return float(torch.quantile(torch.tensor(values, dtype=torch.float64), 0.5)) if values else 0.0

    def replay(self, max_rows: int, generator: torch.Generator) -> RolloutBatch | None:
        """The replay batch (module docstring): advantages Â = R − P50(H) on the rows with Â ≥ 0, a uniform subsample
        of 2^⌊log₂ n⌋ of them (at most ``max_rows``); the buffer is emptied. None when no row is left."""
        rows, self.rows, self.entry = self.rows, None, []
        if rows is None:
            return None
        adv = rows.rewards.float() - torch.tensor(self.baseline(), dtype=torch.float32)  # (N,) in the rewards' precision
        keep = (adv >= 0).nonzero().flatten()
        n = keep.numel()
        if n == 0:
            return None
        size = min(2 ** int(math.floor(math.log2(n))), max_rows)
        pick = keep[torch.randperm(n, generator=generator)[:size].sort().values]
        out = rows.select(pick)
        return out.replace(advantages=adv[pick])

    def get_extra_state(self) -> dict:
        return {"rows": self.rows.state_dict() if self.rows is not None else {}, "entry": list(self.entry),
                "history": [list(h) for h in self.history]}

    def set_extra_state(self, state: dict) -> None:
        self.rows = RolloutBatch.from_state(state["rows"])
        self.entry = [int(e) for e in state["entry"]]
        self.history = [[float(x) for x in h] for h in state["history"]]

    def extra_repr(self) -> str:
        return f"tolerance={self.tolerance}, baseline_size={self.baseline_size}"


def mean_token_advantage(advantages: Tensor, mask: Tensor) -> Tensor:
    """Per-row mean advantage over the row's loss tokens ((B,) advantages are their own mean). -> (B,)."""
    if advantages.dim() == 1:
        return advantages
    m = mask.to(advantages.dtype)
    return (advantages * m).sum(1) / m.sum(1).clamp(min=1)


__all__ = ["SelfImitationBuffer", "mean_token_advantage"]
