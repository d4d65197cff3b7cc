"""HAPO's token-level group average (Heterogeneous Adaptive Policy Optimization, "From Uniform to
Heterogeneous", arXiv 2509.16591; code github.com/starriver030515/HAPO, ``verl/trainer/ppo/core_algos.py``).

Group statistics are weighted by completion length, as a token-mean loss weights the samples, so the
advantage is unbiased at the token level (Σ_{i∈k} L_i A_i = 0; GRPO only has Σ_i A_i = 0):

    μ^tok_k = Σ_{g_i=k} L_i r_i / Σ_{g_i=k} L_i
    σ^tok_k = sqrt( Σ_{g_i=k} L_i (r_i − μ^tok_k)² / Σ_{g_i=k} L_i )           population (length-weighted) std
    A_i     = (r_i − μ^tok_{g_i}) / (σ^tok_{g_i} + eps)
    fallback: if any |A_i| >= 5 in group k (a long outlier dominates the weights), group k gets GRPO's
              (r_i − μ_k) / (σ_k + eps) with the unbiased std instead

All-equal groups and groups of one give exactly 0. A group whose completions are all empty (Σ L = 0) has no
token weights and takes the GRPO fallback.
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.advantages.base import AdvantageEstimator, check_rewards
from common.advantages.group import grpo
from common.batch import RolloutBatch
from common.ops import check_groups, group_first, group_max, group_sum


def hapo_advantage(rewards: Tensor, lengths: Tensor, group_ids: Tensor, *, eps: float = 1e-6,
                   fallback_threshold: float = 5.0, num_groups: int | None = None) -> Tensor:
    """Token-level group average with the GRPO fallback (arXiv 2509.16591, HAPO §"Token-Level Group Average";
    see the module docstring). Shapes: rewards (B,), lengths (B,) >= 0, group_ids (B,) -> (B,)."""
    n = check_groups(rewards, group_ids, num_groups)
    check_rewards(rewards)
    if lengths.shape != rewards.shape or lengths.device != rewards.device:
        raise ValueError(f"lengths must be (B,) = {tuple(rewards.shape)} on {rewards.device}, "
                         f"got {tuple(lengths.shape)} on {lengths.device}")
    if bool((lengths < 0).any()):
        raise ValueError("lengths must be >= 0 (completion token counts)")
    r = rewards - group_first(rewards, group_ids, n)[group_ids]  # (B,) shift: all-equal groups are exact zeros
    w = lengths.to(r.dtype)  # (B,)
    total = group_sum(w, group_ids, n)  # (K,) Σ L
    mu = group_sum(w * r, group_ids, n) / total.clamp(min=1)  # (K,)
    centred = r - mu[group_ids]  # (B,)
    sigma = (group_sum(w * centred**2, group_ids, n) / total.clamp(min=1)).sqrt()  # (K,) population
    A = centred / (sigma[group_ids] + eps)  # (B,)
    A = torch.where(sigma[group_ids] > 0, A, torch.zeros_like(A))  # no spread among the weighted rows -> 0
    fallback = (group_max(A.abs(), group_ids, n) >= fallback_threshold) | (total == 0)  # (K,)
    return torch.where(fallback[group_ids], grpo(rewards, group_ids, scale="group", eps=eps, num_groups=n), A)


class HAPOAdvantage(AdvantageEstimator):
    """HAPO's token-level group average from a RolloutBatch (see :func:`hapo_advantage`).

    Args:
        eps: added to σ before dividing (code 1e-6), in both the token-level and the fallback GRPO branch.
        fallback_threshold: a group with any |A| >= this uses GRPO's advantage instead (code 5).
    """

    min_group_size = 2  # group-relative: a group of one has advantage 0

    def __init__(self, eps: float = 1e-6, fallback_threshold: float = 5.0):
        problems = []
        if eps < 0:
            problems.append(f"eps must be >= 0, got {eps}")
        if not fallback_threshold > 0:
            problems.append(f"fallback_threshold must be > 0, got {fallback_threshold}")
        if problems:
            raise ValueError("HAPOAdvantage: " + "; ".join(problems))
        self.eps, self.fallback_threshold = eps, fallback_threshold

    def __call__(self, batch: RolloutBatch) -> Tensor:  # (B,)
        return hapo_advantage(batch.rewards, batch.lengths.to(batch.rewards.device), batch.group_ids, eps=self.eps,
                              fallback_threshold=self.fallback_threshold)
