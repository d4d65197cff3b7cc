"""Preference losses: DPO (pairwise) and ADPO (anchored, soft, listwise), with an online pair/list path that
builds preferences from the scored groups of the GRPO loop.

DPO — Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290, eq. 7; conservative/label-smoothed
variant as in TRL's ``sigmoid`` loss):

    s_i = Σ_t m_it ℓ_it,   s^ref_i = Σ_t m_it ℓ^ref_it                          sequence log-probs (B,)
    Δ   = (s_w − s^ref_w) − (s_l − s^ref_l)                                     per pair (w chosen, l rejected)
    L   = −(1 − ε_ls) log σ(βΔ) − ε_ls log σ(−βΔ)                               ε_ls = 0: plain DPO

ADPO — Anchored Direct Preference Optimization (arXiv 2510.18913, abstract: "minimise KL(q ‖ softmax((s − s_anchor)/τ))";
the per-group soft target follows the author's verl integration ``verl/trainer/adpo/core_algos.py``):

    p_θ(i) = softmax_{i ∈ group} ((s_i − s^a_i) / τ)                             anchored listwise policy (B,)
    q(i)   = softmax_{i ∈ group} (Â_i / β_r),  Â = (r − μ_g) / (σ_g + 1e-8)      soft target (σ unbiased)
    L      = (1/K) Σ_groups KL(q ‖ p_θ)
    pairwise (n = 2, q = (q_w, 1 − q_w)):  L = −q_w log σ(Δ/τ) − (1 − q_w) log σ(−Δ/τ) + const,
    so q_w = 1, τ = 1/β gives L_DPO exactly. The anchor s^a is the frozen reference ("reference") or the behaviour
    policy of the step ("old", ADPO's on-policy mode). Adding c to every s_i of a group leaves L unchanged.

Online path (inside the GRPO loop): DPO takes, in every group, the best-scored row as chosen and the worst as
rejected (first row on ties; a group whose non-empty rows all score the same gives no pair); ADPO uses every
non-empty row of the group as one list. Rows with an empty completion (no valid token) take part in neither.
Normalisation: both losses divide by K, the number of groups in the optimiser batch (a group without a pair adds
0, as GRPO's zero-advantage groups do); with several micro-batches 1/K is taken as (1/K_micro)·(B'_micro/B'),
exact when every group has the same number of non-empty rows. Groups must lie whole inside a micro-batch
(``micro_batch_size`` a multiple of G).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from common.advantages.group import grpo
from common.losses.aggregate import Normaliser
from common.losses.base import LossOutput, PolicyLoss, check_token_shapes
from common.ops import check_groups, group_count, group_max, group_min, group_sum, masked_sum

if TYPE_CHECKING:
    from common.batch import RolloutBatch

# ADPO's target standardisation Â = (r − μ)/(σ + 1e-8), as in the author's code
_ADPO_STD_EPS = 1e-8


def dpo_loss(chosen_logratio: Tensor, rejected_logratio: Tensor, *, beta: float = 0.1,
             label_smoothing: float = 0.0) -> Tensor:
    """Per-pair DPO loss −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ), Δ = chosen_logratio − rejected_logratio, where a
    log-ratio is s − s^ref (sequence log-prob under the policy minus under the reference).
    Shapes: (N,), (N,) -> (N,)."""
    if chosen_logratio.shape != rejected_logratio.shape:
        raise ValueError(f"chosen_logratio {tuple(chosen_logratio.shape)} and rejected_logratio "
                         f"{tuple(rejected_logratio.shape)} must have the same shape (N,)")
    z = beta * (chosen_logratio - rejected_logratio)  # (N,)
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def preference_pairs(rewards: Tensor, group_ids: Tensor, valid: Tensor, num_groups: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Chosen = best-scored valid row, rejected = worst-scored valid row of every group (first row on ties).

    Shapes: rewards (B,), group_ids (B,), valid (B,) bool -> chosen (K,) long, rejected (K,) long, has_pair (K,)
    bool with K = num_groups (default B); rows of groups without a pair are 0 (mask them with has_pair).
    """
    K = check_groups(rewards, group_ids, num_groups)
    B = rewards.shape[0]
    rows = torch.arange(B, device=rewards.device)
    lowest, highest = torch.finfo(rewards.dtype).min, torch.finfo(rewards.dtype).max
    best = group_max(torch.where(valid, rewards, lowest), group_ids, K, validate=False)  # (K,)
    worst = group_min(torch.where(valid, rewards, highest), group_ids, K, validate=False)  # (K,)
    none = torch.full((K,), B, dtype=torch.long, device=rewards.device)
    is_best = valid & (rewards == best[group_ids])  # (B,)
    is_worst = valid & (rewards == worst[group_ids])  # (B,)
    chosen = none.scatter_reduce(0, group_ids, torch.where(is_best, rows, B), reduce="amin")  # (K,)
    rejected = none.scatter_reduce(0, group_ids, torch.where(is_worst, rows, B), reduce="amin")  # (K,)
    has_pair = (chosen < B) & (rejected < B) & (best > worst)  # (K,)
    return chosen.clamp(max=max(B - 1, 0)), rejected.clamp(max=max(B - 1, 0)), has_pair


def adpo_targets(rewards: Tensor, group_ids: Tensor, *, beta_r: float = 0.5, valid: Tensor | None = None,
                 num_groups: int | None = None) -> Tensor:
    """ADPO's soft listwise target q = softmax_group(Â / β_r), Â the group-standardised rewards (unbiased σ,
    eps 1e-8; an all-equal group gives Â = 0, so q is uniform). Rows outside ``valid`` get q = 0 and are not
    part of their group's list. Shapes: rewards (B,), group_ids (B,) -> q (B,), summing to 1 over each group."""
    if beta_r <= 0:
        raise ValueError(f"beta_r must be > 0, got {beta_r}")
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid
    # invalid rows go to their own slots past the K groups, so they never enter a group's statistics
    K = check_groups(rewards, group_ids, num_groups)
    B = rewards.shape[0]
    gid = torch.where(valid, group_ids, K + torch.arange(B, device=group_ids.device))  # (B,)
    A = grpo(rewards, gid, eps=_ADPO_STD_EPS, num_groups=K + B)  # (B,)
    return group_softmax(A / beta_r, gid, K + B).masked_fill(~valid, 0.0)


def group_softmax(x: Tensor, group_ids: Tensor, num_groups: int | None = None) -> Tensor:
    """softmax of ``x`` within each group. Shapes: (B,), (B,) -> (B,)."""
    return torch.exp(group_log_softmax(x, group_ids, num_groups))


def group_log_softmax(x: Tensor, group_ids: Tensor, num_groups: int | None = None) -> Tensor:
    """log-softmax of ``x`` within each group (shifted by the group max). Shapes: (B,), (B,) -> (B,)."""
    K = check_groups(x, group_ids, num_groups, "x")
    shift = group_max(x.detach(), group_ids, K, validate=False)[group_ids]  # (B,)
    z = x - shift
    return z - torch.log(group_sum(torch.exp(z), group_ids, K, validate=False))[group_ids]


def adpo_loss(scores: Tensor, anchor_scores: Tensor, targets: Tensor, group_ids: Tensor, *, tau: float = 0.8,
              valid: Tensor | None = None, num_groups: int | None = None) -> Tensor:
    """Per-group ADPO loss KL(q ‖ softmax((s − s^a)/τ)) (module docstring). Rows outside ``valid`` are not part of
    any list. Shapes: scores, anchor_scores, targets (B,) (targets sum to 1 per group), group_ids (B,) -> (K,)."""
    if scores.shape != anchor_scores.shape or scores.shape != targets.shape:
        raise ValueError(f"scores {tuple(scores.shape)}, anchor_scores {tuple(anchor_scores.shape)} and targets "
                         f"{tuple(targets.shape)} must all be (B,)")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    K = check_groups(scores, group_ids, num_groups, "scores")
    B = scores.shape[0]
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid
    gid = torch.where(valid, group_ids, K + torch.arange(B, device=group_ids.device))  # (B,) invalid: own slots
    log_p = group_log_softmax((scores - anchor_scores) / tau, gid, K + B)  # (B,)
    q = torch.where(valid, targets, torch.zeros_like(targets))
    log_q = torch.log(q.clamp(min=torch.finfo(q.dtype).tiny))
    per_row = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q))  # (B,) q log(q/p); 0·log 0 = 0
    return group_sum(per_row, gid, K + B, validate=False)[:K]


def _sequence_scores(logprobs: Tensor, mask: Tensor) -> Tensor:
    return masked_sum(logprobs, mask, dim=1)  # (B,) s_i = Σ_t m ℓ


def _group_share(group_ids: Tensor, mask: Tensor, norm: Normaliser) -> tuple[Tensor, Tensor, int]:
    """Local group ids of a micro-batch in [0, B), the factor that turns a sum over its groups into its share of
    (1/K) Σ_k over the optimiser batch, (1/K_micro)·(B'_micro/B'), and the number of group slots B."""
    _, local = torch.unique(group_ids, return_inverse=True)  # (B,) in [0, K_micro)
    B = group_ids.shape[0]
    K_micro = (group_count(local, B) > 0).sum()  # ()
    share = mask.any(1).sum().clamp(min=1) / (K_micro.clamp(min=1) * norm.num_sequences)  # ()
    return local, share, B


def _rewards_of(batch: "RolloutBatch | None", B: int, device: torch.device, who: str) -> Tensor:
    if batch is None or batch.rewards is None:
        raise ValueError(f"{who} needs batch= with batch.rewards (B,) and batch.group_ids (B,) to build preferences")
    r = batch.rewards.to(device)
    if r.shape != (B,):
        raise ValueError(f"{who}: batch.rewards must be (B,) = ({B},), got {tuple(r.shape)}")
    return r


class DPOLoss(PolicyLoss):
    """Online DPO inside the GRPO loop: per group, the best- vs the worst-scored completion (module docstring).

    The reference is the frozen initial policy (the module builds it because ``needs_reference`` is True; with
    LoRA it is the adapter switched off). The ``advantages`` argument is unused.

    Args:
        beta: β, the inverse temperature of the implicit reward β·log(π/π_ref) (paper 0.1).
        label_smoothing: ε_ls, the probability that a preference label is flipped (conservative DPO; 0 = DPO).
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        problems = []
        if not beta > 0:
            problems.append(f"beta must be > 0, got {beta}")
        if not 0 <= label_smoothing < 0.5:
            problems.append(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if problems:
            raise ValueError("DPOLoss: " + "; ".join(problems))
        self.beta, self.label_smoothing = beta, label_smoothing

    @property
    def needs_reference(self) -> bool:
        return True

    def __call__(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                 ref_logprobs: Tensor | None = None, entropy: Tensor | None = None,
                 normaliser: Normaliser | None = None, batch: "RolloutBatch | None" = None) -> LossOutput:
        """Shapes: logprobs, old_logprobs, ref_logprobs, mask (B, T); ``batch`` the same B rows."""
        check_token_shapes(logprobs, old_logprobs, mask)
        if ref_logprobs is None or ref_logprobs.shape != logprobs.shape:
            raise ValueError(f"DPOLoss needs ref_logprobs of shape {tuple(logprobs.shape)} (B, T), got "
                             f"{None if ref_logprobs is None else tuple(ref_logprobs.shape)}")
        B = logprobs.shape[0]
        r = _rewards_of(batch, B, logprobs.device, "DPOLoss")
        norm = normaliser if normaliser is not None else Normaliser.of(mask)
        local, share, slots = _group_share(batch.group_ids.to(logprobs.device), mask, norm)
        logratio = _sequence_scores(logprobs, mask) - _sequence_scores(ref_logprobs, mask)  # (B,) s − s^ref
        chosen, rejected, has_pair = preference_pairs(r, local, mask.any(1), slots)  # (B,) each, one per group slot
        per_pair = dpo_loss(logratio[chosen], logratio[rejected], beta=self.beta, label_smoothing=self.label_smoothing)
        per_pair = torch.where(has_pair, per_pair, torch.zeros_like(per_pair))  # (B,)
        loss = per_pair.sum() * share
        margin = (logratio[chosen] - logratio[rejected]).detach()  # (B,) Δ per group slot
        pairs = has_pair.float()
        metrics = {
            "pg_loss": loss.detach(),
            "pair_frac": pairs.sum() * share,
            "reward_margin": (self.beta * margin * pairs).sum() * share,  # β·Δ summed over pairs, /K
            "reward_accuracy": ((margin > 0).float() * pairs).sum() * share,  # implicit reward ranks chosen first
            "kl": masked_sum(logprobs.detach() - ref_logprobs, mask) / norm.num_tokens,
        }
        if entropy is not None:
            metrics["entropy"] = masked_sum(entropy, mask).detach() / norm.num_tokens
        return LossOutput(loss=loss, metrics=metrics)


class ADPOLoss(PolicyLoss):
    """Online ADPO inside the GRPO loop: each group's completions are one list, the soft target is the softmax of
    the group-standardised rewards (module docstring). The ``advantages`` argument is unused.

    Args:
        tau: τ, temperature of the anchored scores (code τ_0 = 0.8; the code's adaptive τ is not implemented).
        beta_r: β_r, temperature of the soft target softmax(Â/β_r) (code 0.5).
        anchor: "old" (the behaviour policy of the step: ADPO's on-policy mode, no reference model) or
            "reference" (the frozen initial policy: ADPO's fixed-anchor mode).
        drop_all_failed: skip groups whose rewards are all <= 0 (code option ``drop_all_failed_prompts``).
    """

    def __init__(self, tau: float = 0.8, beta_r: float = 0.5, anchor: Literal["old", "reference"] = "old",
                 drop_all_failed: bool = False):
        problems = []
        if not tau > 0:
            problems.append(f"tau must be > 0, got {tau}")
        if not beta_r > 0:
            problems.append(f"beta_r must be > 0, got {beta_r}")
        if anchor not in ("old", "reference"):
            problems.append(f"anchor must be 'old' or 'reference', got {anchor!r}")
        if problems:
            raise ValueError("ADPOLoss: " + "; ".join(problems))
        self.tau, self.beta_r, self.anchor, self.drop_all_failed = tau, beta_r, anchor, drop_all_failed

    @property
    def needs_reference(self) -> bool:
        return self.anchor == "reference"

    def __call__(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                 ref_logprobs: Tensor | None = None, entropy: Tensor | None = None,
                 normaliser: Normaliser | None = None, batch: "RolloutBatch | None" = None) -> LossOutput:
        """Shapes: logprobs, old_logprobs, ref_logprobs, mask (B, T); ``batch`` the same B rows."""
        check_token_shapes(logprobs, old_logprobs, mask)
        anchor_lp = old_logprobs if self.anchor == "old" else ref_logprobs
        if anchor_lp is None or anchor_lp.shape != logprobs.shape:
            raise ValueError(f"ADPOLoss(anchor={self.anchor!r}) needs {self.anchor} log-probs of shape "
                             f"{tuple(logprobs.shape)} (B, T), got {None if anchor_lp is None else tuple(anchor_lp.shape)}")
        B = logprobs.shape[0]
        r = _rewards_of(batch, B, logprobs.device, "ADPOLoss")
        norm = normaliser if normaliser is not None else Normaliser.of(mask)
        local, share, slots = _group_share(batch.group_ids.to(logprobs.device), mask, norm)
        valid = mask.any(1)  # (B,)
        if self.drop_all_failed:
            any_success = group_max(torch.where(valid, r, torch.zeros_like(r)), local, slots, validate=False) > 0  # (B,)
            valid = valid & any_success[local]
        q = adpo_targets(r.to(logprobs.dtype), local, beta_r=self.beta_r, valid=valid, num_groups=slots)  # (B,)
        s, s_a = _sequence_scores(logprobs, mask), _sequence_scores(anchor_lp, mask).detach()  # (B,) each
        per_group = adpo_loss(s, s_a, q, local, tau=self.tau, valid=valid, num_groups=slots)  # (B,) per group slot
        loss = per_group.sum() * share
        metrics = {
            "pg_loss": loss.detach(),
            "list_frac": (group_sum(valid.float(), local, slots, validate=False) > 1).float().sum() * share,
            "kl": masked_sum(logprobs.detach() - anchor_lp, mask) / norm.num_tokens,
        }
        if entropy is not None:
            metrics["entropy"] = masked_sum(entropy, mask).detach() / norm.num_tokens
        return LossOutput(loss=loss, metrics=metrics)
