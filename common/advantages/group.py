"""Group-relative advantages: GRPO, Dr.GRPO, RLOO, REINFORCE++-baseline, MC-GRPO, NGRPO.

Each estimator is a pure function ``f(rewards (B,), group_ids (B,), ...) -> advantages (B,)`` plus a small
class that binds its hyperparameters for YAML (``model.advantage: {class_path: common.advantages.group.GRPO}``).
A group whose rewards are all equal, and a group of one, get advantage exactly 0 (never NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from common.advantages.base import AdvantageEstimator, check_rewards
from common.batch import RolloutBatch
from common.ops import check_groups, group_count, group_first, group_mean, group_median, group_std, group_sum


def _shifted(rewards: Tensor, group_ids: Tensor, num_groups: int) -> Tensor:
    """Rewards minus a member of their group: advantages are shift-invariant per group, and an all-equal
    group becomes exact zeros, so its advantage is exactly 0 (no float residue such as 7 x 0.1 / 7 != 0.1)."""
    return rewards - group_first(rewards, group_ids, num_groups, validate=False)[group_ids]  # (B,)


def grpo(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    scale: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-6,
    num_groups: int | None = None,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Group-relative advantage (GRPO; Shao et al. 2024, arXiv 2402.03300, §4.1.2).

        A_i = (r_i − μ_g) / (σ_g + eps)     scale="group": σ_g the unbiased (ddof=1) std of group g
        A_i = (r_i − μ_g) / (σ_B + eps)     scale="batch": σ_B the std of all B rewards (TRL's scale_rewards="batch")
        A_i =  r_i − μ_g                    scale="none":  Dr.GRPO (Liu et al. 2025, arXiv 2503.20783, §3.1)

    ``all_reduce`` (the sum over data-parallel ranks, a collective): σ_B is the std of the global batch's rewards,
    from summed counts, sums and squared deviations (two passes), as one process would compute it on every rank's
    rows; groups lie on one rank, so μ_g and σ_g need none. Shapes: rewards (B,), group_ids (B,) -> (B,).
    All-equal groups and groups of one give exactly 0.
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    num_groups = check_groups(rewards, group_ids, num_groups)  # before check_rewards: devices first
    check_rewards(rewards)
    r = _shifted(rewards, group_ids, num_groups)  # (B,)
    centred = r - group_mean(r, group_ids, num_groups, validate=False)[group_ids]  # (B,) exactly 0 in all-equal groups
    if scale == "group":
        return centred / (group_std(r, group_ids, num_groups, validate=False)[group_ids] + eps)
    if scale == "batch" and all_reduce is not None:
        n, std = _global_std(rewards, all_reduce)  # (), ()
        return torch.where(n > 1, centred / (std + eps), centred)
    if scale == "batch" and rewards.numel() > 1:
        return centred / (rewards.std(unbiased=True) + eps)
    return centred


def _global_std(rewards: Tensor, all_reduce: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """(N, σ): the number of rows over all ranks and the unbiased std of every rank's rewards (B_r,) together,
    both (). Two passes (the mean, then the squared deviations from it), one all-reduce each; σ = 0 for N < 2."""
    n, total = all_reduce(torch.stack([rewards.new_tensor(float(rewards.numel())), rewards.sum()]))  # (2,)
    mean = total / n.clamp(min=1)  # ()
    squares = all_reduce((rewards - mean).pow(2).sum())  # ()
    return n, (squares / (n - 1).clamp(min=1)).sqrt()


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
    n = group_count(group_ids, num_groups, rewards.dtype, validate=False)[group_ids]  # (B,)
    others = group_sum(r, group_ids, num_groups, validate=False)[group_ids] - r  # (B,)
    baseline = others / (n - 1).clamp(min=1)  # (B,)
    return torch.where(n > 1, r - baseline, torch.zeros_like(r))


def reinforce_pp(
    rewards: Tensor,
    group_ids: Tensor,
    lengths: Tensor | None = None,
    *,
    eps: float = 1e-6,
    num_groups: int | None = None,
    all_gather: Callable[[Tensor], tuple[Tensor, int]] | None = None,
) -> Tensor:
    """REINFORCE++-baseline (Hu et al. 2025, arXiv 2501.03262, §3, eq. 10): group-mean baseline, then whitening
    over every valid token of the batch

        A'_i = r_i − μ_g                                    (each of row i's L_i tokens carries A'_i)
        m    = Σ_i L_i A'_i / Σ_i L_i,     s² = Σ_i L_i (A'_i − m)² / (Σ_i L_i − 1)
        A_i  = (A'_i − m) / (s + eps)

    Eq. 10 normalises A_{q,o_t} over the tokens of the batch, so a long response weighs L_i times: rewards [1, 0]
    in one group with lengths [1, 3] give [1.5, −0.5] (per sequence they would be [0.707, −0.707]). This is verl's
    ``compute_reinforce_plus_plus_baseline_outcome_advantage`` (``masked_whiten``, ddof 1 over tokens); OpenRLHF
    divides the token variance by Σ L_i (ddof 0), which scales every A_i by sqrt((N − 1)/N), N = Σ L_i.

    ``all_gather`` (every rank's rows in rank order and this rank's start, a collective; e.g.
    ``common.distributed.all_gather_rows``): m and s² are over the valid tokens of every data-parallel rank's rows,
    computed on the gathered (A'_i, L_i) exactly as one process computes them on the global batch (groups lie on
    one rank, so μ_g needs none); None: over this batch. Shapes: rewards (B,), group_ids (B,), lengths (B,) valid
    tokens per row (None: one per row, i.e. whitening over sequences, for one-action rows) -> (B,). If every A'
    on a counted token is equal (e.g. every group is all-equal), or fewer than two tokens count, the result is all
    0; rows with no tokens get the formula's value but carry no gradient.
    """
    centred = grpo(rewards, group_ids, scale="none", num_groups=num_groups)  # (B,)
    if lengths is None:
        weights = torch.ones_like(centred)  # (B,)
    else:
        if lengths.shape != rewards.shape:
            raise ValueError(f"lengths must have shape (B,) = {tuple(rewards.shape)}, got {tuple(lengths.shape)}")
        if lengths.device != rewards.device:
            raise ValueError(f"lengths is on {lengths.device} but rewards on {rewards.device}; put them on one device")
        if bool(((lengths < 0) | ~torch.isfinite(lengths.double())).any()):  # ok: one sync, input check
            raise ValueError(f"lengths must be finite token counts >= 0, got {lengths.tolist()[:8]}")  # ok: error path
        weights = lengths.to(centred.dtype)  # (B,)
    if all_gather is None:
        return _token_whiten(centred, weights, eps)
    both, start = all_gather(torch.stack([centred, weights], 1))  # (Σ_r B_r, 2) every rank's (A'_i, L_i)
    return _token_whiten(both[:, 0], both[:, 1], eps)[start:start + centred.numel()]  # (B,) this rank's rows


def _token_whiten(centred: Tensor, weights: Tensor, eps: float) -> Tensor:
    """REINFORCE++'s whitening of ``centred`` (B,) with row weights (B,) = tokens per row (see :func:`reinforce_pp`)."""
    if centred.numel() == 0:
        return centred
    tokens = weights.sum()  # () N = Σ L_i
    first = (weights > 0).int().argmax()  # () the first row with tokens (0 if none)
    shifted = centred - centred[first]  # (B,) exact zeros on the counted rows when their A' are all equal
    mean = (weights * shifted).sum() / tokens.clamp(min=1)  # ()
    var = (weights * (shifted - mean) ** 2).sum() / (tokens - 1).clamp(min=1)  # () ddof 1 over tokens
    out = (shifted - mean) / (var.sqrt() + eps)  # (B,)
    return torch.where((tokens > 1) & (var > 0), out, torch.zeros_like(out))


class GRPO(AdvantageEstimator):
    """GRPO advantage from a RolloutBatch (see :func:`grpo`).

    Args:
        scale: "group" (σ of the group, GRPO), "batch" (σ of the batch) or "none" (Dr.GRPO).
        eps: added to σ before dividing (verl's default 1e-6).
    """

    min_group_size = 2  # group-centred: a group of one has advantage 0

    def __init__(self, scale: Literal["group", "batch", "none"] = "group", eps: float = 1e-6):
        if scale not in ("group", "batch", "none"):
            raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.scale, self.eps = scale, eps

    def __call__(self, batch: RolloutBatch) -> Tensor:  # (B,)
        return grpo(batch.rewards, batch.group_ids, scale=self.scale, eps=self.eps, all_reduce=self.all_reduce)


class DrGRPO(GRPO):
    """Dr.GRPO: ``GRPO(scale="none")`` (see :func:`dr_grpo`)."""

    def __init__(self):
        super().__init__(scale="none")


class RLOO(AdvantageEstimator):
    """Leave-one-out baseline (see :func:`rloo`)."""

    min_group_size = 2  # group-centred: a group of one has advantage 0

    def __call__(self, batch: RolloutBatch) -> Tensor:  # (B,)
        return rloo(batch.rewards, batch.group_ids)


class ReinforcePP(AdvantageEstimator):
    """REINFORCE++-baseline (see :func:`reinforce_pp`): whitened over the batch's valid tokens, each row weighted by
    its tokens in the loss (``batch.loss_mask``: the completion's tokens, less any written by an environment).
    Under data parallelism (the Loop's ``all_gather``) the batch is the global one: every rank's valid tokens.

    Args:
        eps: added to the batch std before dividing.
    """

    min_group_size = 2  # group-centred: a group of one has advantage 0
    # every rank's rows, set by the Loop under data parallelism: the whitening is over the global batch's tokens
    all_gather: Callable[[Tensor], tuple[Tensor, int]] | None = None

    def __init__(self, eps: float = 1e-6):
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = eps

    def __call__(self, batch: RolloutBatch) -> Tensor:  # (B,)
        return reinforce_pp(batch.rewards, batch.group_ids, batch.loss_mask.sum(1), eps=self.eps, all_gather=self.all_gather)


# ------------------------------------------------------------------------------------ MC-GRPO and NGRPO

MCScale = Literal["mad", "std", "none"]


def mc_grpo(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    scale: MCScale = "mad",
    eps: float = 1e-3,
    num_groups: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Median-centred GRPO (MC-GRPO; arXiv 2601.22582; authors' code ``grpo_trainer_math.py``).

        n = G + 1 rollouts per prompt (odd), med_g = median_g(r), MAD_g = median_g(|r − med_g|)
        A_i = (r_i − med_g) / (MAD_g + eps)      scale="mad" (authors' code; eps 1e-3)
        A_i = (r_i − med_g) / (σ_g + eps)        scale="std" (σ unbiased, over all n rewards)
        A_i =  r_i − med_g                       scale="none"
        keep_i = (i is not the pivot of its group)   one member equal to med_g per group (lowest row) is dropped

    Returns ``(advantages (B,), keep (B,) bool)``: the module trains on ``keep`` rows only, G per prompt.
    Other members tied with the median keep A = 0 and stay in the batch (they count in token-mean
    denominators, as in the authors' code). Binary rewards with n = 3 give MAD = 0, so A = ±1/eps = ±1000.
    All-equal groups: A = 0, pivot still dropped. Raises ValueError for an even group size.
    """
    if scale not in ("mad", "std", "none"):
        raise ValueError(f"scale must be 'mad', 'std' or 'none', got {scale!r}")
    if eps <= 0 and scale != "none":
        raise ValueError(f"eps must be > 0 (MAD is 0 whenever two of three rewards agree), got {eps}")
    num_groups = check_groups(rewards, group_ids, num_groups)
    check_rewards(rewards)
    count = group_count(group_ids, num_groups, torch.long)  # (N,)
    even = (count > 0) & (count % 2 == 0)  # (N,)
    if bool(even.any()):  # ok: one sync, for the error message
        raise ValueError(
            f"mc_grpo needs an odd group size (num_generations = G + 1, e.g. group_size 3 for G = 2), got group "
            f"size(s) {sorted(set(count[even].tolist()))}; set the module's group_size to an odd number"  # ok: error path only
        )
    r = _shifted(rewards, group_ids, num_groups)  # (B,) exact zeros in all-equal groups
    med = group_median(r, group_ids, num_groups, validate=False)  # (N,) a member of each odd group
    centred = r - med[group_ids]  # (B,) exactly 0 for the median's ties
    if scale == "mad":
        centred = centred / (group_median(centred.abs(), group_ids, num_groups, validate=False)[group_ids] + eps)
    elif scale == "std":
        centred = centred / (group_std(r, group_ids, num_groups, validate=False)[group_ids] + eps)
    B = rewards.shape[0]
    rows = torch.arange(B, device=rewards.device)  # (B,)
    candidate = torch.where(r == med[group_ids], rows, torch.full_like(rows, B))  # (B,) median members
    pivot = torch.full((num_groups,), B, dtype=torch.long, device=rewards.device)
    pivot = pivot.scatter_reduce_(0, group_ids, candidate, reduce="amin")  # (N,) lowest median row per group
    return centred, rows != pivot[group_ids]


def ngrpo(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    max_reward: float = 1.0,
    num_virtual: int = 1,
    eps: float = 1e-6,
    num_groups: int | None = None,
) -> Tensor:
    """Negative-enhanced GRPO advantage calibration (NGRPO; arXiv 2509.18851, §3.1; authors' verl code
    ``compute_ngrpo_outcome_advantage``): each group gets ``num_virtual`` virtual samples of reward ``max_reward``.

        R'_g = {r_i : g_i = g} ∪ {r_max} × v
        A_i  = (r_i − mean(R'_g)) / (std(R'_g, ddof=1) + eps)         only the real samples get an advantage

    So an all-wrong group is pushed down (G = 8, r = 0: A = −1/sqrt(G + 1) = −1/3) and an all-correct group
    gets exactly 0. ``num_virtual=0`` is GRPO. Groups of one are not special-cased: with the virtual sample they
    have two values (the authors' μ=0, σ=1 rule for one-sample groups is not applied; unverified which size it
    tests). Shapes: (B,), (B,) -> (B,). Raises ValueError if a reward exceeds ``max_reward``.
    """
    if num_virtual < 0:
        raise ValueError(f"num_virtual must be an integer >= 0, got {num_virtual}")
    num_groups = check_groups(rewards, group_ids, num_groups)
    check_rewards(rewards)
    if bool((rewards > max_reward).any()):  # ok: one sync, for the error message
        raise ValueError(
            f"max_reward={max_reward} must be >= every reward (the virtual sample is the best possible one), got "
            f"rewards up to {float(rewards.max())}; raise max_reward to the reward's upper bound"
        )
    s = rewards - max_reward  # (B,) <= 0; the virtual samples sit at exactly 0, all-correct rows too
    n = group_count(group_ids, num_groups, rewards.dtype, validate=False) + num_virtual  # (N,) |R'_g|
    mean = group_sum(s, group_ids, num_groups, validate=False) / n.clamp(min=1)  # (N,) virtual samples add 0 to the sum
    sq = group_sum((s - mean[group_ids]) ** 2, group_ids, num_groups, validate=False) + num_virtual * mean**2  # (N,)
    std = torch.where(n > 1, sq / (n - 1).clamp(min=1), torch.zeros_like(sq)).sqrt()  # (N,) ddof = 1
    centred = s - mean[group_ids]  # (B,)
    return torch.where(std[group_ids] > 0, centred / (std[group_ids] + eps), torch.zeros_like(centred))


class MCGRPO(AdvantageEstimator):
    """MC-GRPO (see :func:`mc_grpo`): returns ``(advantages, keep)``; the module drops each group's pivot.

    Use it with an odd ``group_size`` (G + 1; the paper's focus is G = 2, so 3).

    Args:
        scale: "mad" (authors' code), "std" (unbiased group std) or "none" (median-centred only).
        eps: added to the scale before dividing (authors' code 1e-3).
    """

    min_group_size = 3  # the pivot (median) is dropped: G + 1 >= 3 leaves a non-zero row

    def __init__(self, scale: MCScale = "mad", eps: float = 1e-3):
        if scale not in ("mad", "std", "none"):
            raise ValueError(f"scale must be 'mad', 'std' or 'none', got {scale!r}")
        if eps <= 0 and scale != "none":
            raise ValueError(f"eps must be > 0 (MAD is 0 whenever two of three rewards agree), got {eps}")
        self.scale, self.eps = scale, eps

    def __call__(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:  # (B,), (B,) bool
        return mc_grpo(batch.rewards, batch.group_ids, scale=self.scale, eps=self.eps)


class NGRPO(AdvantageEstimator):
    """NGRPO advantage calibration (see :func:`ngrpo`). Pair with ClippedPolicyLoss(eps_low=0.16,
    eps_high=0.24, aggregation="token_mean") and the DropAllCorrect selector, as in the paper.

    Args:
        max_reward: reward of the virtual sample, the best reward possible (1.0 for 0/1 verifiers).
        num_virtual: virtual samples per group (authors' code 1; 0 = GRPO).
        eps: added to the std before dividing (verl's 1e-6).
    """

    def __init__(self, max_reward: float = 1.0, num_virtual: int = 1, eps: float = 1e-6):
        if num_virtual < 0:
            raise ValueError(f"num_virtual must be an integer >= 0, got {num_virtual}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.max_reward, self.num_virtual, self.eps = max_reward, num_virtual, eps
        self.min_group_size = 1 if num_virtual > 0 else 2  # a virtual sample gives a group of one a non-zero advantage

    def __call__(self, batch: RolloutBatch) -> Tensor:  # (B,)
        return ngrpo(batch.rewards, batch.group_ids, max_reward=self.max_reward, num_virtual=self.num_virtual, eps=self.eps)
