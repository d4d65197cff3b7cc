"""Group-relative advantages: GRPO, Dr.GRPO, RLOO, REINFORCE++-baseline.

Each estimator is a pure function ``f(rewards (B,), group_ids (B,), ...) -> advantages (B,)`` plus a small
class that binds its hyperparameters for YAML (``model.advantage: {class_path: common.advantages.group.GRPO}``).
A group whose rewards are all equal, and a group of one, get advantage exactly 0 (never NaN).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from common.advantages.base import AdvantageEstimator, check_rewards
from common.batch import RolloutBatch
from common.ops import check_groups, group_count, group_first, group_mean, group_std, group_sum


def _shifted(rewards: Tensor, group_ids: Tensor, num_groups: int) -> Tensor:
    """Rewards minus a member of their group: advantages are shift-invariant per group, and an all-equal
    group becomes exact zeros, so its advantage is exactly 0 (no float residue such as 7 x 0.1 / 7 != 0.1)."""
    return rewards - group_first(rewards, group_ids, num_groups)[group_ids]  # (B,)


def grpo(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    scale: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-6,
    num_groups: int | None = None,
) -> Tensor:
    """Group-relative advantage (GRPO; Shao et al. 2024, arXiv 2402.03300, §4.1.2).

        A_i = (r_i − μ_g) / (σ_g + eps)     scale="group": σ_g the unbiased (ddof=1) std of group g
        A_i = (r_i − μ_g) / (σ_B + eps)     scale="batch": σ_B the std of all B rewards (TRL's scale_rewards="batch")
        A_i =  r_i − μ_g                    scale="none":  Dr.GRPO (Liu et al. 2025, arXiv 2503.20783, §3.1)

    Shapes: rewards (B,), group_ids (B,) -> (B,). All-equal groups and groups of one give exactly 0.
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    num_groups = check_groups(rewards, group_ids, num_groups)  # before check_rewards: devices first
    check_rewards(rewards)
    r = _shifted(rewards, group_ids, num_groups)  # (B,)
    centred = r - group_mean(r, group_ids, num_groups)[group_ids]  # (B,) exactly 0 in all-equal groups
    if scale == "group":
        return centred / (group_std(r, group_ids, num_groups)[group_ids] + eps)
    if scale == "batch" and rewards.numel() > 1:
        return centred / (rewards.std(unbiased=True) + eps)
    return centred


def dr_grpo(rewards: Tensor, group_ids: Tensor, *, num_groups: int | None = None) -> Tensor:
    """Dr.GRPO advantage ``A_i = r_i − μ_g`` (arXiv 2503.20783, eq. 3): ``grpo(scale="none")``.

    Pair it with ``aggregation="seq_mean_token_sum_norm"`` (the constant normaliser) to get Dr.GRPO's loss.
    """
    return grpo(rewards, group_ids, scale="none", num_groups=num_groups)


def rloo(rewards: Tensor, group_ids: Tensor, *, num_groups: int | None = None) -> Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740, eq. 5):

        A_i = r_i − (1/(n_g − 1)) Σ_{j≠i, g_j=g_i} r_j  =  n_g/(n_g − 1) · (r_i − μ_g)

    Shapes: (B,), (B,) -> (B,). Groups of one and all-equal groups give 0.
    """
    num_groups = check_groups(rewards, group_ids, num_groups)  # before check_rewards: devices first
    check_rewards(rewards)
    r = _shifted(rewards, group_ids, num_groups)  # (B,)
    n = group_count(group_ids, num_groups, rewards.dtype)[group_ids]  # (B,)
    others = group_sum(r, group_ids, num_groups)[group_ids] - r  # (B,)
    baseline = others / (n - 1).clamp(min=1)  # (B,)
    return torch.where(n > 1, r - baseline, torch.zeros_like(r))


def reinforce_pp(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-6, num_groups: int | None = None) -> Tensor:
    """REINFORCE++-baseline (Hu et al. 2025, arXiv 2501.03262, §3): group-mean baseline, then batch whitening

        A'_i = r_i − μ_g,      A_i = (A'_i − mean_B(A')) / (std_B(A') + eps)

    Batch statistics are over this (rank-local) batch. Shapes: (B,), (B,) -> (B,). If every A' is equal
    (e.g. every group is all-equal) the result is all 0.
    """
    centred = grpo(rewards, group_ids, scale="none", num_groups=num_groups)  # (B,)
    if centred.numel() < 2:
        return torch.zeros_like(centred)
    shifted = centred - centred[0]  # exact zeros when every A' is equal
    return (shifted - shifted.mean()) / (shifted.std(unbiased=True) + eps)


class GRPO(AdvantageEstimator):
    """GRPO advantage from a RolloutBatch (see :func:`grpo`).

    Args:
        scale: "group" (σ of the group, GRPO), "batch" (σ of the batch) or "none" (Dr.GRPO).
        eps: added to σ before dividing (verl's default 1e-6).
    """

    def __init__(self, scale: Literal["group", "batch", "none"] = "group", eps: float = 1e-6):
        if scale not in ("group", "batch", "none"):
            raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.scale, self.eps = scale, eps

    def __call__(self, batch: RolloutBatch) -> Tensor:  # (B,)
        return grpo(batch.rewards, batch.group_ids, scale=self.scale, eps=self.eps)


class DrGRPO(GRPO):
    """Dr.GRPO: ``GRPO(scale="none")`` (see :func:`dr_grpo`)."""

    def __init__(self):
        super().__init__(scale="none")


class RLOO(AdvantageEstimator):
    """Leave-one-out baseline (see :func:`rloo`)."""

    def __call__(self, batch: RolloutBatch) -> Tensor:  # (B,)
        return rloo(batch.rewards, batch.group_ids)


class ReinforcePP(AdvantageEstimator):
    """REINFORCE++-baseline (see :func:`reinforce_pp`).

    Args:
        eps: added to the batch std before dividing.
    """

    def __init__(self, eps: float = 1e-6):
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = eps

    def __call__(self, batch: RolloutBatch) -> Tensor:  # (B,)
        return reinforce_pp(batch.rewards, batch.group_ids, eps=self.eps)
