"""SPEAR: Self-imitation with Progressive Exploration for Agentic RL ("Learn the Ropes, Then Trust the Wins",
Tencent Youtu, arXiv 2509.22601, §3; authors' code TencentYoutuResearch/SPEAR ``verl-agent``: ``core_algos.py``
``compute_policy_loss_clip_cov``, ``ray_trainer_hybrid.py`` ``TrajectoryBufferBatch``, ``dp_actor.py`` (replay
weight), ``agent_system/reward_manager/episode.py`` (tool reward)); shared/methods/agentic.md §7.

A curriculum over exploration. Early, an intrinsic tool-call reward pushes skill-level exploration; later,
self-imitation of the agent's own successes takes over, its weight ramping up; replayed advantages are recalibrated
against a slowly moving baseline, and Clip-Cov curbs entropy collapse. At global step τ:

    tool reward     R̃_e = R_e + 1[τ ≤ T_tool]·min(1, 0.1·n_tool,e)·½(1 + cos(π τ / T_tool))      (``tool_schedule``
                    "cosine"; "constant" drops the cosine factor; "none" disables it); n_tool = the episode's turns
    on-policy       the loop's estimator on R̃ (Dr.BoT: GRPO without std, ``common.advantages.group.DrGRPO``) and
                    loss (Clip-Cov, ``common.losses.entropy.ClipCovLoss``: ρ 2e-4, lb 1, ub 5)
    buffer          after each step: rows with mean token advantage > 0 (tokens, π_old log-probs, R̃), tagged τ;
                    eviction, baseline history H and recalibration Â = R − P50(H): common/replay/sil_buffer.py
    replay          when the buffer holds more than 1.5·``buffer_size`` rows: Â ≥ 0 rows, 2^⌊log₂ n⌋ of them (at
                    most ``buffer_size``); the buffer is emptied
    replay loss     the clipped surrogate with Clip-Cov (ρ 0.02, lb 2, ub 60), ratio against the *stored* π_old
                    (off-policy, clipped), its own aggregation over the replay rows
    weight          c_rep(τ) = c·½(1 − cos(π τ / T_rep)) for τ ≤ T_rep, else c       (cosine warm-up 0 -> c)
    total           L = L_on-policy + c_rep(τ)·L_replay

The replay loss is added through ``extra_loss``: the replay batch is cut into micro-batches of the loop's
``micro_batch_size`` and each of the update's micro-batches, from the first, adds one of them (a forward of the
policy on the replayed rows), normalised by the whole replay batch, so the chunks sum to c_rep·L_replay. The
replay batch is built at the step's ``after_score`` and consumed in the same step's update (a replay batch with
more chunks than the update has micro-batches loses the rest: logged as ``spear/replay_dropped``). The step
counter τ is a buffer (checkpointed); Clip-Cov's draws are keyed by (seed, τ, call), so a resumed run repeats them.

Not implemented (Dr.BoT's other tricks): masking overlong / repetitive / unreadable responses and the
keep-the-highest-std-groups rollout filter.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from common.batch import RolloutBatch
from common.losses.aggregate import Normaliser
from common.losses.base import LossOutput
from common.losses.entropy import ClipCovLoss
from common.methods.base import Method
from common.ops import group_count, group_mean
from common.policies.base import PolicyOutput
from common.replay.sil_buffer import SelfImitationBuffer, mean_token_advantage

if TYPE_CHECKING:
    from common.loop import Loop


def tool_bonus_weight(step: int, total: int, schedule: Literal["cosine", "constant", "none"] = "cosine") -> float:
    """1[τ ≤ T_tool]·½(1 + cos(π τ / T_tool)) ("cosine"), 1[τ ≤ T_tool] ("constant"), 0 ("none")."""
    if schedule == "none" or step > total:
        return 0.0
    return 1.0 if schedule == "constant" else 0.5 * (1.0 + math.cos(math.pi * step / total))


def replay_weight(step: int, total: int, coef: float) -> float:
    """c_rep(τ) = c·½(1 − cos(π τ / T_rep)) for τ ≤ T_rep, else c (T_rep = 0: c from the start)."""
    if total <= 0 or step >= total:
        return coef
    return coef * 0.5 * (1.0 - math.cos(math.pi * step / total))


class SPEAR(Method):
    """SPEAR's tool reward schedule, self-imitation buffer and replay loss (module docstring).

    Args:
        tool_schedule: "cosine" (SPEAR), "constant" or "none".
        tool_steps: T_tool (SPEAR 200).
        tool_scale: the bonus per tool call (0.1; the bonus is capped at 1).
        buffer_size: replay batch size; replay starts when the buffer holds more than 1.5x this (SPEAR 2048).
        baseline_size: group means kept in the baseline history (SPEAR 10240).
        tolerate_steps: buffer rows older than min(this, 10) steps are evicted (SPEAR 5).
        replay_coef: c (SPEAR's script 1).
        replay_steps: T_rep of the cosine warm-up (SPEAR's config 200).
        replay_loss: the replay surrogate (default Clip-Cov ρ 0.02, lb 2, ub 60, ε 0.2/0.28, dual-clip 10,
            seq_mean_token_sum_norm, SPEAR's replay settings).
        seed: seed of the replay subsample.
    """

    requires = ("num_turns",)  # n_tool: the episode's turns (MultiTurnAgentPolicy)
    needs_old_logprobs = True  # stored with the rows: the replay ratio is against π_old at collection

    def __init__(self, tool_schedule: Literal["cosine", "constant", "none"] = "cosine", tool_steps: int = 200,
                 tool_scale: float = 0.1, buffer_size: int = 2048, baseline_size: int = 10240, tolerate_steps: int = 5,
                 replay_coef: float = 1.0, replay_steps: int = 200, replay_loss: ClipCovLoss | None = None, seed: int = 0):
        super().__init__()
        problems = []
        if tool_schedule not in ("cosine", "constant", "none"):
            problems.append(f"tool_schedule must be 'cosine', 'constant' or 'none', got {tool_schedule!r}")
        if tool_steps < 1 or buffer_size < 1 or replay_steps < 0:
            problems.append(f"tool_steps and buffer_size must be >= 1 and replay_steps >= 0, got {tool_steps}, "
                            f"{buffer_size}, {replay_steps}")
        if tool_scale < 0 or replay_coef < 0:
            problems.append(f"tool_scale and replay_coef must be >= 0, got {tool_scale}, {replay_coef}")
        if problems:
            raise ValueError("SPEAR: " + "; ".join(problems))
        self.tool_schedule, self.tool_steps, self.tool_scale = tool_schedule, tool_steps, tool_scale
        self.buffer_size, self.replay_coef, self.replay_steps, self.seed = buffer_size, replay_coef, replay_steps, seed
        self.replay_loss = replay_loss if replay_loss is not None else ClipCovLoss(
            ratio=0.02, lb=2.0, ub=60.0, eps_low=0.2, eps_high=0.28, dual_clip=10.0, aggregation="seq_mean_token_sum_norm")
        self.buffer = SelfImitationBuffer(tolerate_steps=tolerate_steps, baseline_size=baseline_size)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # τ, the global step
        self.pending: list[RolloutBatch] = []  # this step's replay micro-batches (built and consumed in one step)
        self.pending_norm: Normaliser | None = None
        self.last: dict[str, float] = {}

    # ------------------------------------------------------------------ step 2 -> 3: tool reward, replay batch
    def tool_bonus(self, num_turns: Tensor, step: int) -> Tensor:
        """min(1, scale·n_tool)·w(τ). Shapes: (B,) -> (B,)."""
        w = tool_bonus_weight(step, self.tool_steps, self.tool_schedule)
        return (self.tool_scale * num_turns.float()).clamp(max=1.0) * w

    def after_score(self, loop: "Loop", batch: RolloutBatch) -> RolloutBatch:
        step = int(self.steps)
        batch.require("SPEAR (a multi-turn agent policy provides num_turns)", "num_turns")
        bonus = self.tool_bonus(batch.num_turns.to(batch.rewards.device), step)  # (B,)
        self.last = {"spear/tool_bonus": float(bonus.mean()) if bonus.numel() else 0.0}
        self.prepare_replay(loop, step)
        return batch.replace(rewards=batch.rewards + bonus.to(batch.rewards.dtype))

    def prepare_replay(self, loop: "Loop", step: int) -> None:
        """Build the step's replay batch when the buffer holds more than 1.5·buffer_size rows (a later generation
        round of the same step finds the buffer empty and keeps the batch already built)."""
        if len(self.buffer) <= 1.5 * self.buffer_size:
            return
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        replay = self.buffer.replay(self.buffer_size, generator)
        self.last["spear/replay_rows"] = float(replay.batch_size if replay is not None else 0)
        if replay is None:
            return
        device = loop.policy.device if hasattr(loop.policy, "device") else "cpu"
        replay = replay.to(device)
        self.pending = replay.split(loop.micro_batch_size or replay.batch_size)
        self.pending_norm = Normaliser.of(replay.loss_mask, loop.policy.horizon)
        self.replay_loss.set_step(step)

    # ------------------------------------------------------------------ step 6: the replay loss
    def extra_loss(self, loop: "Loop", micro: RolloutBatch, out: PolicyOutput, normaliser: Normaliser) -> LossOutput | None:
        if not self.pending:
            return None
        chunk = self.pending.pop(0)
        coef = replay_weight(int(self.steps), self.replay_steps, self.replay_coef)
        lp = loop.policy(chunk).logprobs  # (b, T) with gradient
        old = chunk.old_logprobs.to(lp.dtype)
        res = self.replay_loss(lp, old, chunk.advantages.to(lp.dtype), chunk.loss_mask, normaliser=self.pending_norm,
                               batch=chunk)
        return LossOutput(loss=coef * res.loss, metrics={"spear/replay_loss": res.loss.detach()})

    # ------------------------------------------------------------------ after the update: buffer, baseline, τ
    @torch.no_grad()
    def after_update(self, loop: "Loop", batch: RolloutBatch) -> dict[str, Tensor]:
        step = int(self.steps)
        dropped = len(self.pending)
        self.pending, self.pending_norm = [], None
        if batch.batch_size:
            old = batch.old_logprobs if batch.old_logprobs is not None else None
            if old is not None and old.dim() == 3:
                old = old[..., 0]
            good = mean_token_advantage(batch.advantages, batch.loss_mask) > 0  # (B,)
            if old is not None and bool(good.any()):  # ok: one sync per step
                self.buffer.add(batch.replace(old_logprobs=old).select(good), step)
            gids = batch.group_ids
            G = int(gids.max()) + 1  # ok: one sync per step
            present = group_count(gids, G) > 0
            self.buffer.push_baseline(group_mean(batch.rewards.float(), gids, G)[present].tolist())
        self.buffer.evict(step)
        self.steps += 1
        out = dict(self.last)
        out.update({"spear/buffer_rows": float(len(self.buffer)), "spear/baseline_p50": self.buffer.baseline(),
                    "spear/replay_coef": replay_weight(step, self.replay_steps, self.replay_coef),
                    "spear/replay_dropped": float(dropped)})
        return {k: torch.tensor(v) for k, v in out.items()}

    def extra_repr(self) -> str:
        return (f"tool_schedule={self.tool_schedule!r}, tool_steps={self.tool_steps}, buffer_size={self.buffer_size}, "
                f"replay_coef={self.replay_coef}, replay_steps={self.replay_steps}")


__all__ = ["SPEAR", "replay_weight", "tool_bonus_weight"]
