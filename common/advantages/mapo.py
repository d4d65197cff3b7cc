"""MAPO: Mixed Advantage Policy Optimization for long-horizon multi-turn dialogue (Zhang et al., arXiv 2603.06194,
v2 "MICA"; agentic.md §10). Dense per-turn process rewards (a judge's score) are turned into Monte-Carlo returns
and normalised at two scopes, then mixed:

    G_{i,t}       = Σ_{k≥t} γ^{k−t} r_{i,k}                                        (γ = 0.85)
    A^turn_{i,t}  = (G_{i,t} − μ_{(g,t)}) / (σ_{(g,t)} + ε)    same prompt g, same turn index t (removes position bias)
    A^batch_{i,t} = (G_{i,t} − μ_B) / (σ_B + ε)                all turns of the batch (keeps the cross-turn scale)
    A_{i,t}       = w_b · A^batch + w_t · A^turn                (w_b = 0.6, w_t = 0.4: the authors' script)

The estimator source is not public: whether σ is used at each scope is ``turn_std`` / ``batch_std``; a (g, t) group
of one gets A^turn = 0 (ours); σ is the unbiased std. The reward is ``turn_rewards`` (the environment's per-turn
score) or ``process_rewards`` (a judge / PRM) by ``reward_field``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from common.advantages.combine import check_args, in_unit, non_negative, one_of
from common.advantages.turns import TurnAdvantage, need
from common.segment_ops import TurnTable, dense_ids, disc_return, gnorm


def mapo(tt: TurnTable, *, gamma: float = 0.85, w_batch: float = 0.6, w_turn: float = 0.4, turn_std: bool = True,
         batch_std: bool = True, reward_field: Literal["turn_rewards", "process_rewards"] = "turn_rewards",
         eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """MAPO's per-turn advantage and its parts (A, A^batch, A^turn), each (U,)."""
    name = "reward" if reward_field == "turn_rewards" else "process_reward"
    need(tt, "MAPO", name)
    r = getattr(tt, name)
    G = disc_return(r, tt.episode, tt.t, gamma, num_episodes=tt.num_episodes)  # (U,)
    ids, n = dense_ids(tt.group, tt.t)
    a_turn = gnorm(G, ids, n, mode="mean_std" if turn_std else "mean", std="unbiased", eps=eps, singleton="zero")
    a_batch = gnorm(G, torch.zeros_like(tt.t), 1, mode="mean_std" if batch_std else "mean", std="unbiased", eps=eps,
                    singleton="zero")
    return w_batch * a_batch + w_turn * a_turn, a_batch, a_turn


class MAPO(TurnAdvantage):
    """MAPO (see the module docstring).

    Args:
        gamma: discount of the Monte-Carlo returns (0.85).
        w_batch, w_turn: weights of the batch- and turn-level advantages (0.6, 0.4).
        turn_std, batch_std: divide by σ at that scope.
        reward_field: "turn_rewards" or "process_rewards".
        eps: added to σ.
    """

    min_group_size = 1  # the batch scope gives a signal even when each prompt is rolled out once

    def __init__(self, gamma: float = 0.85, w_batch: float = 0.6, w_turn: float = 0.4, turn_std: bool = True,
                 batch_std: bool = True, reward_field: Literal["turn_rewards", "process_rewards"] = "turn_rewards",
                 eps: float = 1e-6):
        check_args("MAPO", in_unit("gamma", gamma),
                   one_of("reward_field", reward_field, ("turn_rewards", "process_rewards")), non_negative("eps", eps))
        self.gamma, self.w_batch, self.w_turn, self.turn_std, self.batch_std = gamma, w_batch, w_turn, turn_std, batch_std
        self.reward_field, self.eps = reward_field, eps
        self.requires = ("episode_ids", "token_turn", "turn_mask", reward_field)
        self.batch_scoped = w_batch != 0

    def turn_advantages(self, tt: TurnTable) -> Tensor:  # (U,)
        return mapo(tt, gamma=self.gamma, w_batch=self.w_batch, w_turn=self.w_turn, turn_std=self.turn_std,
                    batch_std=self.batch_std, reward_field=self.reward_field, eps=self.eps)[0]
