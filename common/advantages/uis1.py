"""UI-S1 semi-online RL (Lu et al., ACL 2026, arXiv 2509.11543; agentic.md §9): discounted step advantages over
(task, turn index) groups plus an episode-level advantage, on rollouts that condition on their own history while the
state comes from an expert trajectory (the patch module that continues after a mismatch is the environment's part).

    G_{i,t}   = r_{i,t} + γ · 1[matched_{i,t} ∧ matched_{i,t+1}] · G_{i,t+1}      (a mismatch cuts the chain)
    A^S_{i,t} = gnorm(G_{i,t}; groups (task, t); unbiased std; singleton → 0)
    A^E_{i,t} = gnorm(r_{i,t}; groups task, over all turns; singleton → raw)     episode_signal="turn_score" (code)
              = gnorm(R_i over the task's episodes; singleton → raw)             episode_signal="episode_return" (paper)
    A_{i,t}   = w_E · A^E + w_S · A^S

``matched`` beyond an episode's last turn counts as 1. Without ``turn_matched`` every turn counts as matched (a plain
discounted return). Defaults follow the authors' script: γ = 0.5, mode mean_std, w_E = w_S = 1.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from common.advantages.combine import check_args, in_unit, non_negative, one_of
from common.advantages.turns import TurnAdvantage, need
from common.segment_ops import TurnTable, dense_ids, disc_return, gnorm


def reset_continuation(matched: Tensor, episode: Tensor, t: Tensor, num_episodes: int) -> Tensor:
    """c_t = matched_t ∧ matched_{t+1} (matched past the last turn = 1). Shapes: (U,) -> (U,) float."""
    T = int(t.max()) + 2 if t.numel() else 1  # ok: one sync, the time axis
    M = torch.ones(num_episodes, T, dtype=torch.bool, device=matched.device)  # (E, T + 1)
    M[episode, t] = matched.bool()
    return (M[episode, t] & M[episode, t + 1]).float()


def uis1(tt: TurnTable, *, gamma: float = 0.5, mode: Literal["mean", "mean_std"] = "mean_std", w_episode: float = 1.0,
         w_step: float = 1.0, episode_signal: Literal["turn_score", "episode_return"] = "turn_score",
         eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """UI-S1's per-turn advantage and its parts (A (U,), A^E (U,), A^S (U,))."""
    need(tt, "UISemiOnline", "reward")
    cont = None
    if tt.matched is not None:
        cont = reset_continuation(tt.matched, tt.episode, tt.t, tt.num_episodes)
    G = disc_return(tt.reward, tt.episode, tt.t, gamma, cont=cont, num_episodes=tt.num_episodes)  # (U,)
    ids, n = dense_ids(tt.group, tt.t)
    a_s = gnorm(G, ids, n, mode=mode, std="unbiased", eps=eps, singleton="zero")
    if episode_signal == "turn_score":
        gid, gn = dense_ids(tt.group)
        a_e = gnorm(tt.reward, gid, gn, mode=mode, std="unbiased", eps=eps, singleton="raw")
    elif episode_signal == "episode_return":
        gid, gn = dense_ids(tt.ep_group)
        a_e = gnorm(tt.ep_outcome, gid, gn, mode=mode, std="unbiased", eps=eps, singleton="raw")[tt.episode]
    else:
        raise ValueError(f"episode_signal must be 'turn_score' or 'episode_return', got {episode_signal!r}")
    return w_episode * a_e + w_step * a_s, a_e, a_s


class UISemiOnline(TurnAdvantage):
    """UI-S1's advantage (see the module docstring). Needs ``turn_rewards`` (the turn scores); ``turn_matched``
    (optional) cuts the returns at mismatches.

    Args:
        gamma: discount of the step returns (authors' 0.5).
        mode: "mean_std" (authors' script) or "mean" (config default).
        w_episode, w_step: weights of A^E and A^S (1, 1).
        episode_signal: "turn_score" (code: the turn's own score over the task's turns) or "episode_return" (paper).
        eps: added to σ.
    """

    requires = ("episode_ids", "token_turn", "turn_mask", "turn_rewards")

    def __init__(self, gamma: float = 0.5, mode: Literal["mean", "mean_std"] = "mean_std", w_episode: float = 1.0,
                 w_step: float = 1.0, episode_signal: Literal["turn_score", "episode_return"] = "turn_score",
                 eps: float = 1e-6):
        check_args("UISemiOnline", in_unit("gamma", gamma), one_of("mode", mode, ("mean", "mean_std")),
                   one_of("episode_signal", episode_signal, ("turn_score", "episode_return")), non_negative("eps", eps))
        self.gamma, self.mode, self.w_episode, self.w_step, self.episode_signal, self.eps = (
            gamma, mode, w_episode, w_step, episode_signal, eps)

    def turn_advantages(self, tt: TurnTable) -> Tensor:  # (U,)
        return uis1(tt, gamma=self.gamma, mode=self.mode, w_episode=self.w_episode, w_step=self.w_step,
                    episode_signal=self.episode_signal, eps=self.eps)[0]
