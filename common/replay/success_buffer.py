"""ARPO's per-task buffer of successful episodes (Lu et al., arXiv 2505.16282; authors' code dvlab-research/ARPO
``verl/trainer/replay_buffer.py``): for every task key a FIFO of at most ``per_task`` successful episodes (whole
rows of a RolloutBatch: prompt, completion with the environment's tokens, masks, token -> turn map, reward).

State (extra state, so in the Lightning checkpoint and loadable with ``weights_only=True``): the rows
(``RolloutBatch.state_dict``) and their task keys.
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.batch import RolloutBatch

# fields that belong to one update (recomputed for a replayed row after injection), never stored
_STEP_FIELDS = ("advantages", "old_logprobs", "ref_logprobs", "values", "entropy")


class SuccessBuffer(torch.nn.Module):
    """Per-task FIFO of successful episodes (module docstring).

    Args:
        per_task: episodes kept per task (ARPO 8); the oldest goes first.
        capacity: episodes kept in all (the oldest go first).
    """

    def __init__(self, per_task: int = 8, capacity: int = 4096):
        super().__init__()
        if per_task < 1 or capacity < 1:
            raise ValueError(f"SuccessBuffer: per_task and capacity must be >= 1, got {per_task}, {capacity}")
        self.per_task, self.capacity = per_task, capacity
        self.rows: RolloutBatch | None = None
        self.keys: list[str] = []

    def __len__(self) -> int:
        return len(self.keys)

    def count(self, key: str) -> int:
        return sum(k == key for k in self.keys)

    def add(self, rows: RolloutBatch, keys: list[str]) -> None:
        """Append ``rows`` (tagged with their task ``keys``); keep each task's newest ``per_task`` and the newest
        ``capacity`` rows overall."""
        if rows.batch_size == 0:
            return
        if len(keys) != rows.batch_size:
            raise ValueError(f"SuccessBuffer.add: {rows.batch_size} rows but {len(keys)} keys")
        rows = rows.replace(group_ids=torch.arange(rows.batch_size, device=rows.group_ids.device),
                            **{f: None for f in _STEP_FIELDS}).to("cpu")
        self.rows = rows if self.rows is None else RolloutBatch.cat([self.rows, rows])
        self.keys = self.keys + list(keys)
        seen: dict[str, int] = {}
        newest = []
        for key in reversed(self.keys):  # ok: host-side bookkeeping of string keys
            seen[key] = seen.get(key, 0) + 1
            newest.append(seen[key] <= self.per_task)
        keep = torch.tensor(newest[::-1]) & (torch.arange(len(self.keys)) >= len(self.keys) - self.capacity)
        self.keys = [k for k, m in zip(self.keys, keep.tolist()) if m]
        self.rows = self.rows.select(keep) if self.keys else None

    def draw(self, key: str, generator: torch.Generator) -> int | None:
        """The buffer index of one episode of task ``key``, uniformly (with replacement across calls); None if the
        task has none."""
        found = [i for i, k in enumerate(self.keys) if k == key]
        if not found:
            return None
        return found[int(torch.randint(len(found), (), generator=generator))]

    def take(self, index: list[int], device: torch.device | str) -> RolloutBatch:
        return self.rows.select(torch.tensor(index, dtype=torch.long)).to(device)

    def get_extra_state(self) -> dict:
        return {"rows": self.rows.state_dict() if self.rows is not None else {}, "keys": list(self.keys)}

    def set_extra_state(self, state: dict) -> None:
        self.rows = RolloutBatch.from_state(state["rows"])
        self.keys = list(state["keys"])

    def extra_repr(self) -> str:
        return f"per_task={self.per_task}, capacity={self.capacity}"


__all__ = ["SuccessBuffer"]
