"""ARPO: success replay into all-fail groups (Agentic Replay Policy Optimization for GUI agents, Lu et al.,
arXiv 2505.16282, §3.2; authors' code dvlab-research/ARPO ``verl/trainer/ray_trainer.py`` ``apply_replay``,
``verl/trainer/replay_buffer.py``); shared/methods/agentic.md §8.

GRPO on long-horizon episodes gets mostly all-failure groups on hard tasks, and an all-failure group has zero
advantage. ARPO keeps, per task, a FIFO of past successes and puts one into every all-failure group:

    reward        R_e (the task's reward; ARPO's OSWorld: eval_e + 0.5·format_e)
    advantage     A_e = (R_e − μ_g)/(σ_g + 1e-6), σ unbiased        (the loop's GRPO estimator, broadcast to the
                                                                      episode's assistant tokens; env tokens masked)
    buffer_k      FIFO of successful episodes of task k (s_e > ``success_threshold``, ARPO 0.1), ``per_task`` = 8
    injection     if std_g(s) < ``std_max`` (0.05) and mean_g(s) < ``mean_max`` (0.2) and buffer_k ≠ ∅:
                  the group's first episode is replaced by one drawn uniformly (with replacement) from buffer_k
    then          the fresh episodes' successes are added to buffer_k

s_e is the success signal (``signal``): the reward (ARPO's eval score) or ``batch.correct`` (the task's verifier).
The hook is ``after_score``: rewards are known, and old / reference log-probs and advantages are computed *after*
injection, so a replayed episode is scored under the current policy as the behaviour policy (ratio 1 at the first
PPO epoch; ARPO's ordering: no off-policy correction). A stored ``behaviour_logprobs`` row keeps the sampler's
log-probs of its own rollout. ARPO's valuable-task selection (training only on tasks the base model solves at least
once) is a data choice, not part of this method.

List ARPO first in ``methods``: a stored episode carries the fields the rollout and scoring gave it, so a part whose
``after_score`` adds a field (a critic's values) must run after the injection.

State: the buffer (``common.replay.success_buffer.SuccessBuffer``, extra state) and a step counter (a buffer) that
seeds each step's draws, so a resumed run draws what the straight run drew.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from common.batch import RolloutBatch
from common.methods.base import Method
from common.ops import group_count, group_first, group_mean, group_std
from common.replay.success_buffer import SuccessBuffer

if TYPE_CHECKING:
    from common.loop import Loop


def all_fail_groups(signal: Tensor, group_ids: Tensor, num_groups: int, *, std_max: float, mean_max: float) -> Tensor:
    """ARPO's injection condition per group: present, std_g(s) < std_max and mean_g(s) < mean_max (σ unbiased, 0
    for a group of one). Shapes: (B,), (B,) -> (num_groups,) bool."""
    s = signal.float()
    present = group_count(group_ids, num_groups) > 0
    std = group_std(s, group_ids, num_groups)  # (G,) 0 for groups of one
    return present & (std < std_max) & (group_mean(s, group_ids, num_groups) < mean_max)


class ARPO(Method):
    """Success replay into all-fail groups (module docstring).

    Args:
        signal: the success score s_e: "rewards" (the reward, ARPO's eval score) or "correct" (the verifier).
        success_threshold: an episode is a success when s_e > this (ARPO 0.1).
        std_max, mean_max: a group is all-fail when std_g(s) < std_max and mean_g(s) < mean_max (ARPO 0.05, 0.2).
        per_task: successes kept per task (ARPO 8).
        capacity: successes kept in all.
        key: the sample field that names the task (the prompt; an environment's task id).
        seed: seed of the draws (each step's generator is seeded by (seed, step)).
    """

    def __init__(self, signal: Literal["rewards", "correct"] = "rewards", success_threshold: float = 0.1,
                 std_max: float = 0.05, mean_max: float = 0.2, per_task: int = 8, capacity: int = 4096,
                 key: str = "prompt", seed: int = 0):
        super().__init__()
        if signal not in ("rewards", "correct"):
            raise ValueError(f"ARPO: signal must be 'rewards' or 'correct', got {signal!r}")
        if std_max <= 0:
            raise ValueError(f"ARPO: std_max must be > 0, got {std_max}")
        self.signal, self.success_threshold, self.std_max, self.mean_max = signal, success_threshold, std_max, mean_max
        self.key, self.seed = key, seed
        self.buffer = SuccessBuffer(per_task=per_task, capacity=capacity)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.last: dict[str, float] = {}

    @property
    def requires(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("correct",) if self.signal == "correct" else ()

    def task_keys(self, batch: RolloutBatch) -> list[str]:
        try:
            return [str(s[self.key]) for s in batch.samples]
        except (KeyError, TypeError) as e:
            raise ValueError(f"ARPO needs samples[i][{self.key!r}] to name each episode's task (set `key`)") from e

    def success_signal(self, batch: RolloutBatch) -> Tensor:
        if self.signal == "correct":
            batch.require("ARPO(signal='correct')", "correct")
            return batch.correct.float()
        return batch.rewards.float()

    @torch.no_grad()
    def after_score(self, loop: "Loop", batch: RolloutBatch) -> RolloutBatch:
        """Replace the first episode of each all-fail group by a stored success of its task, then store the fresh
        successes. Rows keep their positions; the replayed row takes its group's id."""
        if batch.batch_size == 0:
            return batch
        if batch.episode_ids is not None and torch.unique(batch.episode_ids).numel() != batch.batch_size:
            raise ValueError("ARPO replaces whole episodes: each row must hold one episode (the agent's layout "
                             "'episode', layout B), but episode_ids repeat across rows")
        keys = self.task_keys(batch)
        s = self.success_signal(batch)  # (B,)
        gids = batch.group_ids
        G = int(gids.max()) + 1  # ok: one sync per step
        fail = all_fail_groups(s, gids, G, std_max=self.std_max, mean_max=self.mean_max)  # (G,)
        first = group_first(torch.arange(batch.batch_size, device=gids.device, dtype=torch.float32), gids, G).long()  # (G,)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.steps))
        rows, picks = [], []
        for g in fail.nonzero().flatten().tolist():  # ok: host-side lookups of string task keys, all-fail groups only
            row = int(first[g])
            pick = self.buffer.draw(keys[row], generator)
            if pick is not None:
                rows.append(row)
                picks.append(pick)
        out = batch
        if picks:
            replayed = self.buffer.take(picks, gids.device)
            combined = RolloutBatch.cat([batch, replayed])  # (B + n) rows, widths padded to the widest
            index = torch.arange(batch.batch_size, device=gids.device)
            index[torch.tensor(rows, device=gids.device)] = batch.batch_size + torch.arange(len(rows), device=gids.device)
            out = combined.select(index).replace(group_ids=gids)  # the replayed row sits where the first episode was
        fresh = (s > self.success_threshold).nonzero().flatten()  # (n_s,) successes of this step's own rollouts
        if fresh.numel():
            self.buffer.add(batch.select(fresh), [keys[i] for i in fresh.tolist()])
        present = int((group_count(gids, G) > 0).sum())
        self.last = {"arpo/replayed": float(len(picks)), "arpo/all_fail_frac": float(fail.sum()) / max(present, 1),
                     "arpo/buffer_rows": float(len(self.buffer))}
        self.steps += 1
        return out

    def after_update(self, loop: "Loop", batch: RolloutBatch) -> dict[str, Tensor]:
        return {k: torch.tensor(v) for k, v in self.last.items()}

    def extra_repr(self) -> str:
        return (f"signal={self.signal!r}, success_threshold={self.success_threshold}, std_max={self.std_max}, "
                f"mean_max={self.mean_max}, key={self.key!r}")


__all__ = ["ARPO", "all_fail_groups"]
