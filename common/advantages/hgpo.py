"""HGPO: Hierarchy-of-Groups Policy Optimization (He, Feng et al., ICLR 2026, arXiv 2602.22817; agentic.md §4).

Step-wise agents see a short memory of the history, so two turns on the same state can have different contexts;
GiGPO's state-only pool then mixes non-comparable samples. HGPO puts each turn in a nested hierarchy of groups
keyed by the last k_c states (k_c = 1: the current state only, ..., K + 1: the current and K previous states),
normalises the step return in each, and averages the levels with weights favouring the deeper (more consistent)
ones:

    H_{k_c}(u) = {v : group_v = group_u, hist_key_v[k_c − 1] = hist_key_u[k_c − 1]}   (defined for t_u ≥ k_c − 1)
    A_{k_c}(u) = (G_u − μ_H) / (σ_H^pop + ε)   (mean_std; population std)   or   G_u − μ_H   (mean)
    A(u)       = Σ_{k_c ∈ V(u)} w_{k_c} A_{k_c}(u) / (Σ_{k_c ∈ V(u)} w_{k_c} + ε),   w_{k_c} = (k_c + offset − 1)^α
    V(u)       = {k_c : |H_{k_c}(u)| ≥ 2 and A_{k_c}(u) ≠ 0}          (code: zero levels excluded)

``weight_offset=2`` is the recipe's w = (k_c + 1)^α ((k + 2)^α in the paper's k = k_c − 1); 1 gives k_c^α (the
earlier dev version). ``include_zero_levels=True`` keeps zero-valued levels in V(u) (ours: otherwise a deep
consistent group that says 0 is overruled by the biased shallow one). ``base_group`` prepends the trajectory-level
advantage of the turns' episode scores over their group (same mode, k_c = 0, weight 1). No episode term is added
otherwise. G_u is GiGPO's step return (penalty subtracted after discounting).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from common.advantages.turns import TurnAdvantage, need
from common.segment_ops import TurnTable, dense_ids, disc_return, gnorm, hist_keys, seg_stats


def hgpo_levels(G: Tensor, group: Tensor, hkeys: Tensor, *, mode: str, eps: float) -> tuple[Tensor, Tensor]:
    """Per-level advantages and group sizes. Shapes: G, group (U,), hkeys (U, K + 1) -> A (U, K + 1), count (U, K + 1)."""
    adv, cnt = [], []
    for k in range(hkeys.shape[1]):  # ok: loop over the K + 1 history levels
        ids, n = dense_ids(group, hkeys[:, k])
        adv.append(gnorm(G, ids, n, mode=mode, std="population", eps=eps, singleton="drop"))
        c = seg_stats(G, ids, n).count
        cnt.append(torch.where(ids >= 0, c[ids.clamp(min=0)], torch.zeros_like(G)))
    return torch.stack(adv, 1), torch.stack(cnt, 1)


def hgpo(tt: TurnTable, *, K: int = 2, gamma: float = 0.95, alpha: float = 1.0, mode: Literal["mean", "mean_std"] = "mean_std",
         weight_offset: int = 2, include_zero_levels: bool = False, base_group: bool = False,
         invalid_penalty: float = 0.0, eps: float = 1e-6) -> Tensor:
    """HGPO's per-turn advantage (module docstring). Shapes: -> (U,)."""
    need(tt, "HGPO", "reward", "state_key")
    penalty = torch.zeros_like(tt.reward)
    if invalid_penalty and tt.valid is not None:
        penalty = invalid_penalty * (~tt.valid.bool()).to(tt.reward.dtype)
    G = disc_return(tt.reward, tt.episode, tt.t, gamma, num_episodes=tt.num_episodes) - penalty  # (U,)
    hk = hist_keys(tt.state_key.long(), tt.episode, tt.t, K, num_episodes=tt.num_episodes)  # (U, K + 1)
    adv, cnt = hgpo_levels(G, tt.group, hk, mode=mode, eps=eps)  # (U, K + 1)
    kc = torch.arange(1, K + 2, dtype=G.dtype, device=G.device)  # (K + 1,) levels k_c
    w = (kc + weight_offset - 1) ** alpha  # (K + 1,)
    use = cnt >= 2
    if base_group:
        ids, n = dense_ids(tt.group)
        base = gnorm(tt.outcome - penalty, ids, n, mode=mode, std="population", eps=eps, singleton="drop")
        bc = seg_stats(G, ids, n).count[ids]
        adv, use = torch.cat([base[:, None], adv], 1), torch.cat([(bc >= 2)[:, None], use], 1)
        w = torch.cat([w.new_ones(1), w])
    if not include_zero_levels:
        use = use & (adv != 0)
    wu = torch.where(use, w.expand_as(adv), torch.zeros_like(adv))  # (U, L)
    total = (wu * adv).sum(1) / (wu.sum(1) + eps)  # (U,)
    return torch.where(use.any(1), total, torch.zeros_like(total))


class HGPO(TurnAdvantage):
    """HGPO (see the module docstring). Needs ``turn_rewards`` and ``turn_keys`` (history-free state keys).

    Args:
        K: history depth (levels k_c = 1..K + 1; the recipe's K = 2, equal to the env memory length).
        gamma: discount of the step returns (0.95).
        alpha: level-weight exponent (``length_weight_alpha``, 1.0).
        mode: "mean_std" (recipe; population std) or "mean".
        weight_offset: 2 -> w = (k_c + 1)^α (recipe), 1 -> k_c^α.
        include_zero_levels: keep zero-valued levels in the average (ours; the code drops them).
        base_group: add the trajectory-level advantage as level k_c = 0 (weight 1).
        invalid_penalty: c_inv subtracted from an invalid turn's return after discounting.
        eps: added to σ and to the weight normaliser.
    """

    requires = ("episode_ids", "token_turn", "turn_mask", "turn_rewards", "turn_keys")

    def __init__(self, K: int = 2, gamma: float = 0.95, alpha: float = 1.0, mode: Literal["mean", "mean_std"] = "mean_std",
                 weight_offset: int = 2, include_zero_levels: bool = False, base_group: bool = False,
                 invalid_penalty: float = 0.0, eps: float = 1e-6):
        problems = []
        if not isinstance(K, int) or K < 0:
            problems.append(f"K must be an integer >= 0, got {K!r}")
        if not 0.0 <= gamma <= 1.0:
            problems.append(f"gamma must be in [0, 1], got {gamma}")
        if mode not in ("mean", "mean_std"):
            problems.append(f"mode must be 'mean' or 'mean_std', got {mode!r}")
        if weight_offset not in (1, 2):
            problems.append(f"weight_offset must be 1 or 2, got {weight_offset!r}")
        if eps < 0:
            problems.append(f"eps must be >= 0, got {eps}")
        if problems:
            raise ValueError("HGPO: " + "; ".join(problems))
        self.K, self.gamma, self.alpha, self.mode, self.weight_offset = K, gamma, alpha, mode, weight_offset
        self.include_zero_levels, self.base_group, self.invalid_penalty, self.eps = include_zero_levels, base_group, invalid_penalty, eps

    def turn_advantages(self, tt: TurnTable) -> Tensor:  # (U,)
        return hgpo(tt, K=self.K, gamma=self.gamma, alpha=self.alpha, mode=self.mode, weight_offset=self.weight_offset,
                    include_zero_levels=self.include_zero_levels, base_group=self.base_group,
                    invalid_penalty=self.invalid_penalty, eps=self.eps)
