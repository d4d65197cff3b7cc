"""The completions log: every sampled row of a training step as one JSON line, beside the logger's files.

``PolicyOptimizationModule`` writes it every ``log_completions_every`` steps (default every step; 0 = off) when the
Trainer has a logger, into ``<log_dir>/completions/rank<r>.jsonl`` (e.g. ``runs/lightning_logs/version_0/
completions/rank0.jsonl``): one file per data-parallel rank, each with the rows that rank sampled (under DDP a
step's global batch is the union of the ranks' files at that step; no collective is added). One row per sampled
completion, every row the step saw (before a selector's filtering), in batch order::

    {"step": 3, "global_step": 4, "rank": 0, "row": 5, "group": 0, "prompt": "What is 12+30?", "completion": "42",
     "reward": 1.0, "reward_components": {"task_reward": 1.0}, "advantage": 0.35, "length": 3,
     "truncated": false, "correct": true}

- ``step``: the training step, 0-based, the step of the ``train/*`` scalars in TensorBoard (join on it);
  ``global_step``: optimiser steps taken after the step's update (the step of TensorBoard's sample text).
- ``prompt``: the data record's ``"prompt"`` (before the chat template); ``completion``: the decoded completion.
- ``reward``: the reward the advantage estimator saw (the weighted sum of the components, minus an in-reward KL
  and after any method's reshaping); ``reward_components``: each reward function's unweighted score, by name.
- ``advantage``: the row's advantage; for a token-level estimator (B, T) the mean over the completion's tokens.
- ``truncated`` / ``correct``: null where the policy or domain does not say.

Text is written as JSON strings (``json.dumps`` escapes quotes, newlines and control characters; U+0085, U+2028 and
U+2029 are escaped too, so every reader sees one row per line; other Unicode is written as is, a lone surrogate as
its ``\\udcXX`` escape), so a row is the size of its prompt and completion plus a
constant; non-finite numbers are written as null. Policies without text completions (toy bandits) write nothing.
"""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path
from typing import Any

from common.batch import RolloutBatch
from common.ops import masked_mean


# characters str.splitlines() breaks on that json.dumps leaves raw: escaped, so a row is one line for every reader
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _number(x: float) -> float | None:
    return x if math.isfinite(x) else None


def completion_rows(batch: RolloutBatch, step: int, rank: int = 0, global_step: int | None = None) -> list[dict[str, Any]]:
    """The log's rows of ``batch`` (one per row, see the module docstring); [] without text completions."""
    B = batch.batch_size
    if not batch.completions:
        return []
    none = [None] * B
    rewards = batch.rewards.tolist() if batch.rewards is not None else none  # (B,)
    comps = batch.reward_components.tolist() if batch.reward_components is not None else [[] for _ in range(B)]  # (B, K)
    names = list(batch.reward_names)
    adv = batch.advantages
    if adv is not None and adv.dim() == 2:  # (B, T) token-level -> (B,) mean over the completion
        adv = masked_mean(adv, batch.completion_mask, 1)
    adv = adv.tolist() if adv is not None else none
    truncated = batch.truncated.tolist() if batch.truncated is not None else none
    correct = batch.correct.tolist() if batch.correct is not None else none
    rows = []
    for i, (group, length) in enumerate(zip(batch.group_ids.tolist(), batch.lengths.tolist())):  # ok: host-side rows
        sample = batch.samples[i] if batch.samples else {}
        comp = comps[i]
        rows.append({
            "step": step, "global_step": global_step, "rank": rank, "row": i, "group": group, "prompt": sample.get("prompt"),
            "completion": batch.completions[i],
            "reward": _number(rewards[i]) if rewards[i] is not None else None,
            "reward_components": {names[k] if k < len(names) else f"r{k}": _number(v) for k, v in enumerate(comp)},
            "advantage": _number(adv[i]) if adv[i] is not None else None,
            "length": length, "truncated": truncated[i], "correct": correct[i],
        })
    return rows


class CompletionsLog:
    """Appends each step's rows to ``<log_dir>/completions/rank<rank>.jsonl`` (module docstring).

    Args:
        log_dir: the logger's directory of the run (``trainer.log_dir``).
        rank: this process's global rank.
        every: write the steps that are multiples of this (>= 1).
    """

    def __init__(self, log_dir: str | Path, rank: int = 0, every: int = 1):
        if every < 1:
            raise ValueError(f"CompletionsLog: every must be >= 1, got {every}")
        self.path = Path(log_dir) / "completions" / f"rank{rank}.jsonl"
        self.rank, self.every = rank, every

    def write(self, batch: RolloutBatch, step: int, global_step: int | None = None) -> int:
        """Append the rows of ``batch`` at training step ``step`` if it is one to log; returns the rows written."""
        if step % self.every:
            return 0
        rows = completion_rows(batch, step, self.rank, global_step)
        if not rows:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r, ensure_ascii=False, default=str).translate(_LINE_BREAKS) + "\n" for r in rows)
        with open(self.path, "a", encoding="utf-8", errors="backslashreplace") as f:  # lone surrogates -> \udcXX
            f.write(text)
        return len(rows)


_WRITERS: "weakref.WeakKeyDictionary[Any, CompletionsLog]" = weakref.WeakKeyDictionary()  # one per Trainer


def check_every(every: int) -> int:
    """``log_completions_every`` validated at start-up (>= 0, 0 = off)."""
    if not isinstance(every, int) or every < 0:
        raise ValueError(f"log_completions_every must be an integer >= 0 (0 = off), got {every!r}")
    return every


def log_completions(module: Any, rollouts: RolloutBatch, every: int) -> None:
    """The RL module's hook (``log_step``): write the step's rows when ``every`` > 0 and the Trainer has a logger,
    at the step of the ``train/*`` scalars. Every rank calls it at the same step (``trainer.log_dir`` broadcasts
    rank 0's directory, a collective), so the ranks' files lie side by side."""
    trainer = module._trainer  # None for a module stepped by hand
    if not every or trainer is None or not trainer.loggers:
        return
    if trainer not in _WRITERS:
        _WRITERS[trainer] = CompletionsLog(trainer.log_dir, trainer.global_rank, every)
    step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", module.global_step)  # the scalars' step
    _WRITERS[trainer].write(rollouts, step, module.global_step)


__all__ = ["CompletionsLog", "check_every", "completion_rows", "log_completions"]
