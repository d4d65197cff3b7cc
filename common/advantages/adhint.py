"""ADHint: Adaptive Hints with Difficulty Priors (arXiv 2512.13095). Paper body and code are not public; the
formulas below follow a secondary summary (shared/methods/text.md §16, §26) and, where it is silent, the spec's
proposals — the clearest reading, not the paper's verified equations.

Hint-based RL prepends a prefix of a reference solution (the "hint") to the response of some rollouts of a prompt.

    difficulty        Diff_q = 1 − mean_{j ≤ n} r_j over the n naive (hint-free) rollouts of prompt q      [2nd]
    hint ratio        ω_q = clip((ω_max − ω_min)·Diff_q + ω_min + ξ, 0, 1),  ξ ~ U(0, noise); ω_q = 0 when
                      Diff_q = 0 (a prompt the policy always solves gets no hint);
                      hint = the first ⌊ω_q·|y*|⌋ tokens of the reference solution y*                          [2nd]
    advantage (AE-RDP, proposal): A_i = (r_i − μ_q)/(σ_q + ε) over all rollouts of q (naive and hinted), then
                      × (1 + Diff_naive,q)       for naive rollouts with A_i > 0  (solving a hard prompt unaided)
                      × (1 + (1 − Diff_hint,q))  for hinted rollouts with A_i < 0 (failing an easy hinted prompt)
                      Diff_naive/hint = 1 − mean reward of the group's naive / hinted rows (rewards clamped to [0, 1])
    selective masking: on a hinted rollout with A_i < 0 the hint tokens get advantage 0 (no gradient pushes the
                      reference solution's probability down); its own continuation keeps A_i.               [2nd]

    CGM (proposal):   on hint tokens w_t = exp(−|log H_t − log H̄_cont|), H̄_cont the mean entropy of the row's own
                      continuation; the token's advantage is multiplied by w_t
                      (``common.losses.adhint.ADHintLoss``)                                             [PROPOSAL]

The estimator returns token-level advantages (B, T), so any clipped loss applies the masking exactly (A = 0 gives a
zero gradient); ``ADHintLoss`` adds CGM on top of the clipped loss (it needs the policy's entropies, which only the
loss sees).
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.advantages.base import AdvantageEstimator, check_rewards
from common.advantages.group import grpo
from common.batch import RolloutBatch
from common.ops import check_groups, group_sum


def hint_ratio(difficulty: Tensor, *, omega_min: float = 0.0, omega_max: float = 0.8, noise: Tensor | None = None) -> Tensor:
    """ω = clip((ω_max − ω_min)·Diff + ω_min + ξ, 0, 1), and 0 where Diff = 0. ``noise`` is ξ (same shape; None = 0).
    Shapes: difficulty (P,) in [0, 1] -> (P,)."""
    if not 0 <= omega_min <= omega_max <= 1:
        raise ValueError(f"need 0 <= omega_min <= omega_max <= 1, got omega_min={omega_min}, omega_max={omega_max}")
    xi = torch.zeros_like(difficulty) if noise is None else noise
    omega = ((omega_max - omega_min) * difficulty + omega_min + xi).clamp(0.0, 1.0)  # (P,)
    return torch.where(difficulty > 0, omega, torch.zeros_like(omega))


def adhint_advantages(rewards: Tensor, group_ids: Tensor, hinted: Tensor, hint_mask: Tensor, *, eps: float = 1e-6,
                      num_groups: int | None = None) -> Tensor:
    """Token-level ADHint advantages (module docstring).

    Shapes: rewards (B,), group_ids (B,), hinted (B,) bool, hint_mask (B, T) bool (the hint tokens at the start of
    each hinted completion) -> (B, T). All-equal groups give 0.
    """
    K = check_groups(rewards, group_ids, num_groups)
    check_rewards(rewards)
    if hinted.shape != rewards.shape or hinted.dtype != torch.bool:
        raise ValueError(f"hinted must be a bool tensor (B,) = {tuple(rewards.shape)}, got {hinted.dtype} {tuple(hinted.shape)}")
    if hint_mask.dim() != 2 or hint_mask.shape[0] != rewards.shape[0] or hint_mask.dtype != torch.bool:
        raise ValueError(f"hint_mask must be a bool tensor (B, T) with B = {rewards.shape[0]}, got "
                         f"{hint_mask.dtype} {tuple(hint_mask.shape)}")
    A = grpo(rewards, group_ids, eps=eps, num_groups=K)  # (B,) over naive and hinted rows together
    r = rewards.clamp(0.0, 1.0)
    naive = ~hinted
    n_naive = group_sum(naive.to(r.dtype), group_ids, K, validate=False)  # (K,)
    n_hint = group_sum(hinted.to(r.dtype), group_ids, K, validate=False)  # (K,)
    diff_naive = 1 - group_sum(r * naive, group_ids, K, validate=False) / n_naive.clamp(min=1)  # (K,)
    diff_hint = 1 - group_sum(r * hinted, group_ids, K, validate=False) / n_hint.clamp(min=1)  # (K,)
    scale = torch.where(naive & (A > 0), 1 + diff_naive[group_ids],
                        torch.where(hinted & (A < 0), 2 - diff_hint[group_ids], torch.ones_like(A)))  # (B,)
    A = A * scale  # (B,)
    protect = hint_mask & (hinted & (A < 0))[:, None]  # (B, T) hint tokens of failed hinted rollouts
    return torch.where(protect, torch.zeros_like(hint_mask, dtype=A.dtype), A[:, None].expand(hint_mask.shape))


def hint_lengths(batch: RolloutBatch, owner: str = "ADHint") -> Tensor:
    """Hint tokens at the start of each completion: the declared field ``batch.hint_len`` (filled by
    ``text_reasoning.hints.ADHintRollout``). -> (B,) long."""
    batch.require(owner, "hint_len")
    return batch.hint_len.to(batch.completion_mask.device)


class ADHint(AdvantageEstimator):
    """ADHint's token-level advantages from a RolloutBatch with ``hint_len`` (B,) (filled by the method part
    ``text_reasoning.hints.ADHintRollout``); see :func:`adhint_advantages`.

    Args:
        eps: added to the group std (verl's 1e-6).
    """

    min_group_size = 2  # GRPO over naive + hinted rows of a group

    requires = ("hint_len",)

    def __init__(self, eps: float = 1e-6):
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = eps

    def __call__(self, batch: RolloutBatch) -> Tensor:  # (B, T)
        k = hint_lengths(batch)  # (B,)
        T = batch.completion_mask.shape[1]
        hint_mask = torch.arange(T, device=k.device)[None, :] < k[:, None]  # (B, T)
        return adhint_advantages(batch.rewards, batch.group_ids, k > 0, hint_mask & batch.completion_mask, eps=self.eps)

