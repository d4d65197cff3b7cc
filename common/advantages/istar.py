"""OPRL / iStar: step-level advantages from an online implicit process reward model (PRM), and the PRM's loss.

"Agentic Reinforcement Learning with Implicit Step Rewards" (v1/v2: "Online Process Reward Learning for Agentic
Reinforcement Learning"; Liu et al., ICLR 2026, arXiv 2509.19199, §3, eqs. 3-7; authors' code
Tongyi-ConvAI/Qwen-Character ``CharacterRL-iStar/istar/core_istar.py``, ``dp_rm.py``, ``rm_utils.py``);
shared/methods/agentic.md §6.

An implicit PRM π_φ (an LM initialised from the policy) is trained online from trajectory preferences only; its
log-ratio to the rollout policy π_θold, summed over a step's tokens, is the step's implicit reward:

    token log-ratio    q_{b,j} = log π_φ(y_{b,j} | ctx) − log π_θold(y_{b,j} | ctx)           (action tokens only)
    step reward        r_φ(u) = β Σ_{j ∈ u} q_{b,j}                                          (eq. 4)
    batch scaling      r̃(u) = r_φ(u) / (max_{u'} |r_φ(u')| + 1e-6)          ``norm="batch"`` (code ``batch_norm``)
    trajectory score   ρ_φ(τ) = Σ_t r_φ(t)  (paper, ``traj_score="sum"``),  (1/T_τ) Σ_t r_φ(t)  (code, "mean")
    PRM loss (DPO)     J(φ) = −mean_{(i,j) ∈ P} log σ(ρ_φ(τ_i) − ρ_φ(τ_j)),  P = {(i, j) in one group: success_i,
                       ¬success_j}; a group without a success or without a failure adds nothing       (eq. 5)
    episode advantage  A^E_e = RLOO over the group's episodes of R_e (``episode="rloo"``, code ``istar_rloo``) or
                       GRPO ("mean": R − μ, "mean_std": (R − μ)/(σ + 1e-6)); one sample per episode (dedup)
    step advantage     A^S(u) = RLOO / mean / mean_std of r̃(u) over every turn of the group        (eq. 6)
    advantage          A(u) = A^E_{e(u)} + α·A^S(u), broadcast to the turn's tokens                  (eq. 7)

A group of one keeps its raw score in RLOO (the code's rule); under "mean"/"mean_std" it gets its raw score too
(agentic.md §2.3 singleton "raw"). ``step_pool="first_turn"`` reproduces the code's pooling (the step baseline from
the first turn of each trajectory only, applied to every turn), which we believe is a bug; the default pools all
turns. ``use_process_only`` drops A^E.

The step rewards reach the estimator as ``RolloutBatch.process_rewards (B, K)``, which the PRM method
(``common.methods.istar.OnlinePRM``) computes with the pre-update φ and then steps φ on :func:`prm_dpo_loss`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from common.advantages.base import AdvantageEstimator, check_rewards
from common.segment_ops import gnorm, rloo, turn_table, turn_to_token

Estimator = Literal["rloo", "mean", "mean_std"]


def trajectory_scores(step_rewards: Tensor, episode: Tensor, num_episodes: int, how: Literal["sum", "mean"] = "mean") -> Tensor:
    """ρ_φ(τ) from the per-turn implicit rewards: their sum ("sum", the paper) or mean over the episode's turns
    ("mean", the code). Shapes: (U,), (U,) -> (E,)."""
    if how not in ("sum", "mean"):
        raise ValueError(f"traj_score must be 'sum' or 'mean', got {how!r}")
    total = step_rewards.new_zeros(num_episodes).index_add(0, episode, step_rewards)  # (E,)
    if how == "sum":
        return total
    n = torch.zeros(num_episodes, device=episode.device, dtype=step_rewards.dtype).index_add_(
        0, episode, torch.ones_like(step_rewards))
    return total / n.clamp(min=1)


def prm_dpo_loss(scores: Tensor, success: Tensor, group: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Trajectory DPO loss of the implicit PRM (eq. 5): −mean over the (success, failure) pairs of one group of
    log σ(ρ_i − ρ_j), by a masked (E, E) outer difference (no loop over pairs). Returns ``(loss, pairs, accuracy)``:
    the loss (0 with a gradient of 0 when there is no pair, never NaN), the number of pairs, and the share of pairs
    with ρ_i > ρ_j. Shapes: scores (E,) float, success (E,) bool, group (E,) long -> (), (), ()."""
    if not (scores.dim() == 1 and scores.shape == success.shape == group.shape):
        raise ValueError(f"scores, success and group must all be (E,), got {tuple(scores.shape)}, "
                         f"{tuple(success.shape)}, {tuple(group.shape)}")
    pair = (group[:, None] == group[None, :]) & success[:, None] & ~success[None, :]  # (E, E) i succeeded, j failed
    diff = scores[:, None] - scores[None, :]  # (E, E)
    n = pair.sum()
    logsig = torch.nn.functional.logsigmoid(diff)
    loss = torch.where(pair, -logsig, torch.zeros_like(logsig)).sum() / n.clamp(min=1).to(scores.dtype)  # +0 without pairs
    acc = ((diff > 0) & pair).sum().to(scores.dtype) / n.clamp(min=1).to(scores.dtype)
    return loss, n, acc


def scale_step_rewards(r: Tensor, norm: Literal["batch", "none"] = "batch") -> Tensor:
    """r̃ = r / (max |r| + 1e-6) over the batch ("batch"), or r unchanged ("none"). Shapes: (U,) -> (U,)."""
    if norm not in ("batch", "none"):
        raise ValueError(f"norm must be 'batch' or 'none', got {norm!r}")
    if norm == "none" or r.numel() == 0:
        return r
    return r / (r.abs().max() + 1e-6)


def _relative(x: Tensor, ids: Tensor, how: Estimator) -> Tensor:
    if how == "rloo":
        return rloo(x, ids)
    if how not in ("mean", "mean_std"):
        raise ValueError(f"estimator must be 'rloo', 'mean' or 'mean_std', got {how!r}")
    return gnorm(x, ids, mode=how, std="unbiased", singleton="raw")


def istar_turn_advantages(outcome: Tensor, ep_group: Tensor, episode: Tensor, turn_group: Tensor, step_reward: Tensor, *,
                          alpha: float = 1.0, episode_estimator: Estimator = "rloo", step_estimator: Estimator = "rloo",
                          norm: Literal["batch", "none"] = "batch", step_pool: Literal["all_turns", "first_turn"] = "all_turns",
                          t: Tensor | None = None, use_process_only: bool = False) -> Tensor:
    """A(u) = A^E_{e(u)} + α·A^S(u) (module docstring). Shapes: outcome (E,), ep_group (E,), episode (U,),
    turn_group (U,), step_reward (U,) r_φ(u), t (U,) the turn index (for ``step_pool="first_turn"``) -> (U,)."""
    a_ep = torch.zeros_like(outcome) if use_process_only else _relative(outcome.float(), ep_group, episode_estimator)  # (E,)
    r = scale_step_rewards(step_reward.float(), norm)  # (U,)
    if step_pool == "all_turns":
        a_step = _relative(r, turn_group, step_estimator)  # (U,)
    elif step_pool == "first_turn":  # the code: μ (and n) from each trajectory's first turn, applied to every turn
        if t is None:
            raise ValueError("step_pool='first_turn' needs t, the turn index of each turn")
        first = t == 0
        n_groups = int(turn_group.max()) + 1 if turn_group.numel() else 0
        cnt = torch.zeros(n_groups, device=r.device).index_add_(0, turn_group[first], torch.ones_like(r[first]))
        tot = torch.zeros(n_groups, device=r.device).index_add_(0, turn_group[first], r[first])
        c, mu = cnt[turn_group], tot[turn_group] / cnt[turn_group].clamp(min=1)
        a_step = torch.where(c > 1, (r - mu) * c / (c - 1).clamp(min=1), r)
    else:
        raise ValueError(f"step_pool must be 'all_turns' or 'first_turn', got {step_pool!r}")
    return a_ep[episode] + alpha * a_step


class IStar(AdvantageEstimator):
    """iStar's token-level (B, T) advantages from ``batch.process_rewards`` (module docstring); the implicit PRM
    method ``common.methods.istar.OnlinePRM`` provides them.

    Args:
        alpha: α, the weight of the step-level advantage (code ``step_advantage_w`` 1).
        episode_estimator, step_estimator: "rloo" (code's ``istar_rloo``), "mean" or "mean_std".
        norm: "batch" (r / max|r|, code) or "none".
        step_pool: "all_turns" (default) or "first_turn" (the code's pooling).
        use_process_only: drop the episode-level advantage.
    """

    min_group_size = 1  # the step-level term is non-zero for a group of one
    requires = ("process_rewards", "episode_ids")

    def __init__(self, alpha: float = 1.0, episode_estimator: Estimator = "rloo", step_estimator: Estimator = "rloo",
                 norm: Literal["batch", "none"] = "batch", step_pool: Literal["all_turns", "first_turn"] = "all_turns",
                 use_process_only: bool = False):
        for name, v, ok in (("episode_estimator", episode_estimator, ("rloo", "mean", "mean_std")),
                            ("step_estimator", step_estimator, ("rloo", "mean", "mean_std")),
                            ("norm", norm, ("batch", "none")), ("step_pool", step_pool, ("all_turns", "first_turn"))):
            if v not in ok:
                raise ValueError(f"IStar: {name} must be one of {ok}, got {v!r}")
        self.alpha, self.episode_estimator, self.step_estimator = alpha, episode_estimator, step_estimator
        self.norm, self.step_pool, self.use_process_only = norm, step_pool, use_process_only

    def __call__(self, batch) -> Tensor:  # (B, T)
        batch.require("IStar (list common.methods.istar.OnlinePRM in methods)", "process_rewards", "episode_ids")
        check_rewards(batch.rewards)
        tt = turn_table(batch)
        a_turn = istar_turn_advantages(tt.ep_outcome, tt.ep_group, tt.episode, tt.group, tt.process_reward,
                                       alpha=self.alpha, episode_estimator=self.episode_estimator,
                                       step_estimator=self.step_estimator, norm=self.norm, step_pool=self.step_pool,
                                       t=tt.t, use_process_only=self.use_process_only)  # (U,)
        return turn_to_token(a_turn, tt.tok_turn)  # (B, T), 0 off the actions


__all__ = ["IStar", "istar_turn_advantages", "prm_dpo_loss", "scale_step_rewards", "trajectory_scores"]
