"""Skywork R1V2's Selective Sample Buffer (SSB): cache samples with non-zero advantage and re-introduce them when a
step's batch has too few informative samples ("vanishing advantages").

Paper: "Skywork R1V2: Multimodal Hybrid Reinforcement Learning for Reasoning" (Wang et al. 2025, arXiv 2504.16656,
§3 SSB). shared/methods/text.md §19; the exact weighting, capacity and refill rule are not published [UNVERIFIED]:

    after advantages:   𝔅 ← 𝔅 ∪ {(x_i, y_i, A_i) : A_i ≠ 0}                      FIFO, capacity C, max age
    update batch:       if #{A_i ≠ 0} < B_eff, draw k = min(B_eff − #{A_i ≠ 0}, |𝔅|) rows from 𝔅 without
                        replacement with P(j) ∝ abs(A_j) (token-level A: the masked mean of abs(A)), and append them
    replayed rows keep their stored advantage; ``consume=True`` removes them once replayed, ``consume=False`` keeps
    them until capacity or ``max_age`` evicts them (both are readings of the paper; neither is confirmed)

The draw happens before this step's rows are stored, so a step never replays its own samples. Old log-probs of the
replayed rows are recomputed by the update loop under the current policy (ratio 1 on the first pass), as for every
row; the paper's use of the stored behaviour log-probs is not reproduced (the module has no per-row old log-prob
input). Draws use the global torch RNG, which the module checkpoints.

State (checkpointed): the buffered rows (tensors, padded to the widest row, plus samples and completions as plain
data via ``get_extra_state``), the step each row was stored at, and the step counter (a buffer).
"""

from __future__ import annotations


import torch
from torch import Tensor

from common.batch import RolloutBatch
from common.ops import masked_mean
from common.sampling.base import Selector


def advantage_magnitude(advantages: Tensor, mask: Tensor) -> Tensor:
    """abs(A_i) per row: sequence-level (B,) as is, token-level (B, T) as the masked mean of abs(A) (0 if empty)."""
    if advantages.dim() == 1:
        return advantages.abs()
    return masked_mean(advantages.abs(), mask, 1)  # (B,)


class SelectiveSampleBuffer(Selector, torch.nn.Module):
    """SSB (arXiv 2504.16656): keep every row, and top the batch up to ``min_nonzero`` informative rows from a
    buffer of past rows with non-zero advantage, drawn with probability ∝ abs(A).

    Args:
        min_nonzero: B_eff, the informative (A ≠ 0) rows an update should have.
        capacity: C, rows kept in the buffer (oldest dropped first).
        max_age: rows stored more than this many steps ago are dropped (None = never).
        consume: a replayed row leaves the buffer (True) or may be replayed again in later steps (False).
    """

    def __init__(self, min_nonzero: int, capacity: int = 256, max_age: int | None = None, consume: bool = True):
        torch.nn.Module.__init__(self)
        problems = []
        if min_nonzero < 1:
            problems.append(f"min_nonzero must be >= 1, got {min_nonzero}")
        if capacity < 1:
            problems.append(f"capacity must be >= 1, got {capacity}")
        if max_age is not None and max_age < 1:
            problems.append(f"max_age must be >= 1 or None, got {max_age}")
        if problems:
            raise ValueError("SelectiveSampleBuffer: " + "; ".join(problems))
        self.min_nonzero, self.capacity, self.max_age, self.consume = min_nonzero, capacity, max_age, consume
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # () calls so far
        self.rows: RolloutBatch | None = None  # (C',) buffered rows, C' <= capacity
        self.stored_at = torch.zeros(0, dtype=torch.long)  # (C',) step each buffered row was stored at
        self.last_replayed = 0  # rows appended by the last call (for logging and tests)

    def __len__(self) -> int:
        return 0 if self.rows is None else self.rows.batch_size

    def _keep(self, keep: Tensor) -> None:
        self.rows = self.rows.select(keep) if bool(keep.any()) else None
        self.stored_at = self.stored_at[keep]

    def replay(self, k: int) -> RolloutBatch:
        """Draw ``k`` buffered rows, P ∝ abs(A) (removed if ``consume``); each replayed row becomes its own group."""
        weights = advantage_magnitude(self.rows.advantages, self.rows.completion_mask).double().cpu()  # (C',)
        pick = torch.multinomial(weights, k, replacement=False)  # (k,)
        out = self.rows.select(pick)
        if self.consume:
            keep = torch.ones(len(self), dtype=torch.bool)
            keep[pick] = False
            self._keep(keep)
        return out.replace(group_ids=torch.arange(k, device=out.group_ids.device))

    def store(self, rows: RolloutBatch) -> None:
        """Append ``rows`` (each its own group) and drop the oldest beyond ``capacity``."""
        if rows.batch_size == 0:
            return
        rows = rows.replace(group_ids=torch.arange(rows.batch_size, device=rows.group_ids.device))
        self.rows = rows if self.rows is None else RolloutBatch.cat([self.rows, rows])
        self.stored_at = torch.cat([self.stored_at, torch.full((rows.batch_size,), int(self.step))])
        if len(self) > self.capacity:
            self._keep(torch.arange(len(self)) >= len(self) - self.capacity)

    @torch.no_grad()
    def __call__(self, rollouts: RolloutBatch) -> RolloutBatch:
        if rollouts.advantages is None:
            raise ValueError("SelectiveSampleBuffer needs rollouts.advantages; it runs after the advantage estimator")
        self.step += 1
        if self.max_age is not None and len(self):
            self._keep(self.stored_at >= int(self.step) - self.max_age)
        informative = advantage_magnitude(rollouts.advantages, rollouts.completion_mask) > 0  # (B,)
        need = self.min_nonzero - int(informative.sum())  # ok: one sync per step
        out, self.last_replayed = rollouts, 0
        if need > 0 and len(self):
            replayed = self.replay(min(need, len(self))).to(rollouts.completion_ids.device)
            self.last_replayed = replayed.batch_size
            out = RolloutBatch.cat([rollouts, replayed])
        self.store(rollouts.select(informative))
        return out

    # ------------------------------------------------------------------ checkpointed state
    def get_extra_state(self) -> dict:
        return {"rows": self.rows.state_dict() if self.rows is not None else {}, "stored_at": self.stored_at}

    def set_extra_state(self, state: dict) -> None:
        self.rows = RolloutBatch.from_state(state["rows"])
        self.stored_at = state["stored_at"].cpu()
