"""iStar's online implicit PRM: step rewards from the PRM's log-ratio, then one PRM step on the trajectory DPO loss.

"Agentic Reinforcement Learning with Implicit Step Rewards" (OPRL; Liu et al., ICLR 2026, arXiv 2509.19199, §3,
Algorithm 1; code ``CharacterRL-iStar/istar/dp_rm.py``, ``rm_utils.py``); shared/methods/agentic.md §6. The
equations are in ``common/advantages/istar.py``. Order per step (the code's ``update='after'``):

    1. roll out with π_θold (the loop)
    2. one PRM forward (pre-update φ) -> q = log π_φ − log π_θold on the action tokens, r_φ(u) = β Σ_{j∈u} q_j
       -> ``process_rewards (B, K)``; the trajectory DPO loss J(φ) on the same forward
    3. one PRM optimiser step on J(φ) (AdamW, its own lr and gradient clip)
    4. the policy update with A = A^E + α A^S (the loop's ``common.advantages.istar.IStar``)

The PRM is a copy of the policy's network made at ``setup`` (initialised from the policy, as the code does); the
parameters that train are those trainable in the policy (all of them, or a LoRA adapter's). π_θold's log-probs are
the policy's own teacher-forced log-probs of the batch before the update. J(φ) couples the episodes of a group, so
its gradient is taken exactly without holding every micro-batch's graph: ∂J/∂ρ (E,) from the scores, then, micro-batch
by micro-batch, ρ's dependence on log π_φ (ρ_e = β/T_e Σ q for "mean", β Σ q for "sum") is back-propagated as the
surrogate Σ_{b,j} w_{b,j} log π_φ(y_{b,j}) with w = ∂J/∂ρ_{e(b)}·β/T_e.

State: the PRM's weights (a submodule: in the checkpoint) and its optimiser's state (extra state). One process:
under data parallelism each rank would step its own PRM on its own rows (not supported; refused at the first step).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from common.advantages.istar import IStar, prm_dpo_loss, trajectory_scores
from common.batch import RolloutBatch
from common.losses.logprobs import token_logprobs
from common.methods.base import Method
from common.segment_ops import turn_sum, turn_table

if TYPE_CHECKING:
    from common.loop import Loop


def with_turn_mask(batch: RolloutBatch) -> RolloutBatch:
    """The batch with ``turn_mask (B, K)`` if it has none: the row's turns are columns k < num_turns (or up to its
    largest token turn), K the most turns of a row."""
    if batch.turn_mask is not None:
        return batch
    first = batch.turn_ids if batch.turn_ids is not None else torch.zeros_like(batch.group_ids)
    if batch.num_turns is not None:
        n = batch.num_turns.long() - first.long()
    elif batch.token_turn is not None:
        n = (batch.token_turn.max(1).values - first + 1).clamp(min=0)
    else:
        n = torch.ones_like(batch.group_ids)
    K = max(int(n.max()) if n.numel() else 1, 1)  # ok: one sync, the table width
    return batch.replace(turn_mask=torch.arange(K, device=n.device)[None, :] < n[:, None])


class OnlinePRM(Method):
    """The implicit PRM of iStar (module docstring). The loop's ``advantage`` must be
    ``common.advantages.istar.IStar``.

    Args:
        beta: β of the implicit reward (code 0.05).
        lr: the PRM's learning rate (code 1e-6).
        max_grad_norm: the PRM's gradient clip (code 10).
        traj_score: "mean" over the episode's steps (code) or "sum" (paper).
        success_threshold: an episode is a success when its reward > this (code: outcome > 0).
    """

    provides = ("process_rewards", "turn_mask")
    requires = ("episode_ids", "token_turn")

    def __init__(self, beta: float = 0.05, lr: float = 1e-6, max_grad_norm: float = 10.0,
                 traj_score: Literal["mean", "sum"] = "mean", success_threshold: float = 0.0):
        super().__init__()
        if beta <= 0 or lr <= 0 or max_grad_norm <= 0:
            raise ValueError(f"OnlinePRM: beta, lr and max_grad_norm must be > 0, got {beta}, {lr}, {max_grad_norm}")
        if traj_score not in ("mean", "sum"):
            raise ValueError(f"OnlinePRM: traj_score must be 'mean' or 'sum', got {traj_score!r}")
        self.beta, self.lr, self.max_grad_norm, self.traj_score = beta, lr, max_grad_norm, traj_score
        self.success_threshold = success_threshold
        self.prm: torch.nn.Module | None = None  # built in setup from the policy's network
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_optimizer_state: dict | None = None
        self.last: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ setup: the PRM, initialised from the policy
    def setup(self, loop: "Loop") -> None:
        if not isinstance(loop.advantage, IStar):
            raise ValueError("OnlinePRM: the advantage must be common.advantages.istar.IStar (it reads the PRM's "
                             f"process_rewards), got {type(loop.advantage).__name__}")
        lm = getattr(loop.policy, "lm", loop.policy)
        if not hasattr(lm, "completion_hidden"):
            raise ValueError(f"OnlinePRM: the policy must be a causal LM (or an agent over one), got {type(lm).__name__}")
        self.lm = [lm]  # a list: not a submodule (the policy's weights are the module's, not the PRM's)
        if self.prm is None:
            self.prm = copy.deepcopy(lm.model)
        params = [p for p in self.prm.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        if self._pending_optimizer_state is not None:
            self.optimizer.load_state_dict(self._pending_optimizer_state)
            self._pending_optimizer_state = None

    def prm_logprobs(self, batch: RolloutBatch) -> Tensor:
        """log π_φ of the completion tokens (0 off the action tokens), with gradient if enabled. -> (B, T)."""
        lm = self.lm[0]
        h = lm.completion_hidden(self.prm, batch)  # (B, T, H)
        m = batch.loss_mask
        head = self.prm.get_output_embeddings()
        lp, _ = token_logprobs(h[m], head.weight, batch.completion_ids[m], bias=head.bias,
                               temperature=lm.sampling.temperature, chunk_size=lm.logprob_chunk_size)
        return torch.zeros(m.shape, device=lp.device, dtype=lp.dtype).masked_scatter(m, lp)

    # ------------------------------------------------------------------ step 2 -> 3: step rewards, one PRM step
    def after_score(self, loop: "Loop", batch: RolloutBatch) -> RolloutBatch:
        from common.distributed import world_size

        if world_size() > 1:
            raise ValueError("OnlinePRM: data parallelism is not supported (each rank would step its own PRM on its "
                             "own rows); train on one device")
        batch = with_turn_mask(batch)
        size = loop.micro_batch_size or batch.batch_size
        micros = batch.split(size)
        with torch.no_grad():
            old = loop.logprobs(batch)  # (B, T) log π_θold: the policy before this step's update
            lp = torch.cat([self.prm_logprobs(m) for m in micros])  # (B, T) pre-update φ
        mask = batch.loss_mask
        q = torch.where(mask, lp - old, torch.zeros_like(lp))  # (B, T)
        tt = turn_table(batch)
        U = tt.episode.shape[0]
        r_turn = self.beta * turn_sum(q, tt.tok_turn, U)  # (U,) r_φ(u)
        process = torch.zeros(batch.turn_mask.shape, dtype=torch.float32, device=q.device)
        process[tt.row, tt.slot] = r_turn.float()  # (B, K)
        self.optimizer.zero_grad(set_to_none=True)
        loss, pairs, acc = self.dpo_backward(batch, micros, tt, r_turn)
        if bool(pairs > 0):  # ok: one sync per step; no pair, no PRM step
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            if bool(torch.isfinite(grad_norm)):  # ok: one sync per step; a non-finite PRM step is skipped
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last = {"prm/loss": loss.detach().float(), "prm/pairs": pairs.float(), "prm/pair_acc": acc.detach().float(),
                     "prm/step_reward_abs": r_turn.abs().mean() if U else torch.zeros(())}
        return batch.replace(process_rewards=process)

    def token_weights(self, batch: RolloutBatch, tt, r_turn: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """∂J/∂ log π_φ(y_{b,j}) for every token (the exact gradient of the DPO loss through the trajectory scores),
        and the loss, pair count and pair accuracy. Shapes: r_turn (U,) -> (B, T) float64, (), (), ()."""
        scores = trajectory_scores(r_turn.detach().double(), tt.episode, tt.num_episodes, self.traj_score)  # (E,)
        scores.requires_grad_(True)
        success = tt.ep_outcome > self.success_threshold  # (E,)
        loss, pairs, acc = prm_dpo_loss(scores, success, tt.ep_group)
        (dscore,) = torch.autograd.grad(loss, scores)  # (E,) ∂J/∂ρ
        ep_of_row = torch.full((batch.batch_size,), -1, dtype=torch.long, device=r_turn.device)
        ep_of_row[tt.row] = tt.episode
        turns = tt.ep_len.to(torch.float64)  # (E,) T_e
        per_episode = dscore * self.beta / (turns.clamp(min=1) if self.traj_score == "mean" else 1.0)  # (E,)
        w_row = torch.where(ep_of_row >= 0, per_episode[ep_of_row.clamp(min=0)], torch.zeros((), dtype=torch.float64))
        token_w = torch.where(tt.tok_turn >= 0, w_row[:, None].expand(tt.tok_turn.shape),
                              torch.zeros((), dtype=torch.float64))  # (B, T) 0 on environment tokens and padding
        return token_w, loss, pairs, acc

    def dpo_backward(self, batch: RolloutBatch, micros: list[RolloutBatch], tt, r_turn: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Accumulate ∂J/∂φ in the PRM's ``.grad``, micro-batch by micro-batch (module docstring); returns the loss,
        pair count and pair accuracy."""
        token_w, loss, pairs, acc = self.token_weights(batch, tt, r_turn)
        if bool(pairs > 0):  # ok: one sync per step
            start = 0
            for micro in micros:  # ok: micro-batches of the PRM's forward
                rows = slice(start, start + micro.batch_size)
                start += micro.batch_size
                (token_w[rows].float() * self.prm_logprobs(micro)).sum().backward()
        return loss, pairs, acc

    def after_update(self, loop: "Loop", batch: RolloutBatch) -> dict[str, Tensor]:
        return dict(self.last)

    # ------------------------------------------------------------------ the PRM optimiser's state
    def get_extra_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}

    def set_extra_state(self, state: dict) -> None:
        opt = state.get("optimizer")
        if opt is None:
            return
        if self.optimizer is not None:
            self.optimizer.load_state_dict(opt)
        else:
            self._pending_optimizer_state = opt

    def extra_repr(self) -> str:
        return f"beta={self.beta}, lr={self.lr}, max_grad_norm={self.max_grad_norm}, traj_score={self.traj_score!r}"


__all__ = ["OnlinePRM", "with_turn_mask"]
