"""GiGPO: Group-in-Group Policy Optimization (Feng et al., NeurIPS 2025, arXiv 2505.10978; agentic.md §3).

Critic-free two-level credit: GRPO's episode-level relative advantage, plus a step-level relative advantage inside
*anchor-state groups*: the turns of one task's episodes that acted on the identical environment state (the hash
of the current observation text, never the history) are pooled and their discounted returns compared.

    s_u   = R_e(u) − c_inv·1[invalid_u]                                  per-turn episode score
    A^E_u = (s_u − mean_g s) / F_norm,  F_norm ∈ {std_g s (unbiased) + ε, 1}   g = the task's group (eq. 4)
    G_u   = Σ_{k≥t} γ^{k−t} r_{e,k}  −  c_inv·1[invalid_u]               penalty after discounting, not propagated
    A^S_u = (G_u − mean_{a(u)} G) / F_norm over the anchor group a(u) = (group, state key)      (eq. 7)
    A_u   = A^E_u + ω·A^S_u                                                                    (eq. 8)

Episode statistics: ``episode_weighting="per_turn"`` (verl-agent's ``compute_mean_std_cross_steps=True``: μ, σ
over every turn row of the group, so an episode weighs its length) or ``"per_episode"`` (the paper: one value per
episode; a turn's penalty is then subtracted unscaled). Singletons: a group of one episode keeps its raw score (μ := 0, σ := 1); an anchor group of one turn gets
A^S = 0. Revisits of a state inside one episode are separate members (the loop's later, more discounted return is
what penalises it).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from common.advantages.combine import check_args, in_unit, non_negative, one_of
from common.advantages.turns import TurnAdvantage, need
from common.segment_ops import TurnTable, dense_ids, disc_return, gnorm

Mode = Literal["mean", "mean_std"]


def episode_advantage(outcome: Tensor, penalty: Tensor, group: Tensor, episode: Tensor, ep_group: Tensor, *,
                      mode: Mode, weighting: Literal["per_turn", "per_episode"], eps: float) -> Tensor:
    """A^E per turn. Shapes: outcome R_e(u), penalty, group, episode (U,); ep_group (E,) -> (U,).

    per_turn (code): gnorm of the turns' scores s_u = R_e − penalty_u over their group (singleton 'raw').
    per_episode (paper): A^E_u = (R_e − μ_g)/F over the group's episodes (one value each; a group of one episode
    keeps R_e), minus the turn's penalty unscaled (ours: dividing a penalty by the σ of all-equal outcomes would
    give ±c_inv/ε)."""
    if weighting == "per_turn":
        ids, n = dense_ids(group)
        return gnorm(outcome - penalty, ids, n, mode=mode, std="unbiased", eps=eps, singleton="raw")
    if weighting != "per_episode":
        raise ValueError(f"episode_weighting must be 'per_turn' or 'per_episode', got {weighting!r}")
    E = ep_group.shape[0]
    ep_outcome = outcome.new_zeros(E).index_put_((episode,), outcome)  # (E,) R_e (every turn of e carries it)
    ids, n = dense_ids(ep_group)
    a_ep = gnorm(ep_outcome, ids, n, mode=mode, std="unbiased", eps=eps, singleton="raw")  # (E,)
    return a_ep[episode] - penalty


def gigpo(tt: TurnTable, *, gamma: float = 0.95, omega: float = 1.0, mode: Mode = "mean",
          episode_weighting: Literal["per_turn", "per_episode"] = "per_turn", invalid_penalty: float = 0.0,
          eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """GiGPO's per-turn advantage (module docstring) and its two parts. Returns (A (U,), A^E (U,), A^S (U,))."""
    need(tt, "GiGPO", "reward", "state_key")
    penalty = torch.zeros_like(tt.reward)
    if invalid_penalty and tt.valid is not None:
        penalty = invalid_penalty * (~tt.valid.bool()).to(tt.reward.dtype)  # (U,)
    a_e = episode_advantage(tt.outcome, penalty, tt.group, tt.episode, tt.ep_group, mode=mode,
                            weighting=episode_weighting, eps=eps)
    G = disc_return(tt.reward, tt.episode, tt.t, gamma, num_episodes=tt.num_episodes) - penalty  # (U,)
    anchor, n = dense_ids(tt.group, tt.state_key.long())  # (U,) −1 where the state is unknown
    a_s = gnorm(G, anchor, n, mode=mode, std="unbiased", eps=eps, singleton="zero")
    return a_e + omega * a_s, a_e, a_s


def anchor_group_size(tt: TurnTable) -> Tensor:
    """The mean anchor-group size over the turns (agentic.md §14.4: ≈ 1 means the keys hold history and A^S ≡ 0)."""
    anchor, n = dense_ids(tt.group, tt.state_key.long())
    count = torch.zeros(max(n, 1)).index_add_(0, anchor.clamp(min=0), (anchor >= 0).float())
    known = anchor >= 0
    return count[anchor.clamp(min=0)][known].mean() if bool(known.any()) else torch.zeros(())


class GiGPO(TurnAdvantage):
    """GiGPO (see the module docstring). Needs ``turn_rewards`` and ``turn_keys`` (``turn_valid`` for the penalty).

    Args:
        gamma: discount of the step returns (verl-agent 0.95).
        omega: weight ω of the step-level advantage (``step_advantage_w``, 1.0); 0 gives episode GRPO.
        mode: "mean" (F_norm = 1, the config default ``mean_norm``) or "mean_std".
        episode_weighting: "per_turn" (code) or "per_episode" (paper).
        invalid_penalty: c_inv subtracted from an invalid turn's score and return (verl-agent 0.1).
        eps: added to σ.
    """

    requires = ("episode_ids", "token_turn", "turn_mask", "turn_rewards", "turn_keys")

    def __init__(self, gamma: float = 0.95, omega: float = 1.0, mode: Mode = "mean",
                 episode_weighting: Literal["per_turn", "per_episode"] = "per_turn", invalid_penalty: float = 0.0,
                 eps: float = 1e-6):
        check_args("GiGPO", in_unit("gamma", gamma), one_of("mode", mode, ("mean", "mean_std")),
                   one_of("episode_weighting", episode_weighting, ("per_turn", "per_episode")),
                   non_negative("eps", eps))
        self.gamma, self.omega, self.mode, self.eps = gamma, omega, mode, eps
        self.episode_weighting, self.invalid_penalty = episode_weighting, invalid_penalty

    def turn_advantages(self, tt: TurnTable) -> Tensor:  # (U,)
        return gigpo(tt, gamma=self.gamma, omega=self.omega, mode=self.mode, episode_weighting=self.episode_weighting,
                     invalid_penalty=self.invalid_penalty, eps=self.eps)[0]
