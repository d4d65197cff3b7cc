"""Factorised group-relative advantages: several rewards, each for its own span of tokens (F-GRPO).

F-GRPO: Factorized Group-Relative Policy Optimization for Unified Candidate Generation and Ranking
(arXiv 2605.12995). One rollout writes a slate and then its ranking; the policy factorises as
``π(s, σ | x) = π_gen(s | x) · π_rank(σ | x, s)`` over one backbone, and each phase k gets its own reward
``R^k`` and its own group-relative advantage, applied only to the tokens of that phase:

    A^k_i    = R^k_i − mean_g R^k                  (Dr.GRPO centring; scale="group" also divides by std_g)
    A_{i,t}  = Σ_k λ_k · m^k_{i,t} · A^k_i / |m^k_i|      phase_normalise=True  (|m^k_i| tokens of phase k in row i)
    A_{i,t}  = Σ_k λ_k · m^k_{i,t} · A^k_i                phase_normalise=False

With ``phase_normalise=True`` and the loss aggregated by ``seq_mean_token_sum`` the clipped surrogate is
exactly the paper's two-phase objective (the surrogate is positively homogeneous in A, so a per-token weight
moves outside the min/clip):

    L = −(1/G) Σ_i [ (1/|m^gen_i|) Σ_t m^gen_{i,t} min(ρ A^gen_i, clip(ρ) A^gen_i)
                   + λ (1/|m^rank_i|) Σ_t m^rank_{i,t} min(ρ A^rank_i, clip(ρ) A^rank_i) ]

The estimator is general: any K rewards ``(B, K)`` and K phase masks ``(B, K, T)``. Phases are usually
contiguous spans given by where each starts (``span_masks``). Groups with equal rewards in a phase give that
phase exactly 0; a phase with no tokens in a row contributes nothing to that row (never NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from common.advantages.base import AdvantageEstimator
from common.advantages.group import grpo
from common.batch import RolloutBatch
from common.ops import check_groups


def span_masks(starts: Tensor, mask: Tensor) -> Tensor:
    """Contiguous phase masks from where each phase starts.

        m^k_{i,t} = mask_{i,t} ∧ starts_{i,k} ≤ t < starts_{i,k+1}     (starts_{i,K} = T)

    Shapes: starts (B, K) long, non-decreasing along K; mask (B, T) bool -> (B, K, T) bool.
    A phase whose start equals the next phase's start is empty.
    """
    if starts.dim() != 2 or mask.dim() != 2 or starts.shape[0] != mask.shape[0]:
        raise ValueError(f"starts must be (B, K) and mask (B, T) with the same B, got {tuple(starts.shape)} and {tuple(mask.shape)}")
    if starts.dtype.is_floating_point or mask.dtype != torch.bool:
        raise ValueError(f"starts must be an integer tensor and mask a bool tensor, got {starts.dtype} and {mask.dtype}")
    if starts.shape[1] > 1 and bool((starts[:, 1:] < starts[:, :-1]).any()):  # ok: input check
        raise ValueError("starts must be non-decreasing along the phase dimension (phase k starts before phase k+1)")
    B, T = mask.shape
    ends = torch.cat([starts[:, 1:], torch.full_like(starts[:, :1], T)], dim=1)  # (B, K)
    t = torch.arange(T, device=mask.device)  # (T,)
    inside = (t >= starts[:, :, None]) & (t < ends[:, :, None])  # (B, K, T)
    return inside & mask[:, None, :]


def factorised_advantages(
    rewards: Tensor,
    phase_masks: Tensor,
    group_ids: Tensor,
    *,
    weights: Tensor | None = None,
    scale: Literal["group", "none"] = "none",
    phase_normalise: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Token advantages from one group-relative advantage per phase (see the module docstring).

    Shapes: rewards (B, K), phase_masks (B, K, T) bool, group_ids (B,), weights (K,) or None (all 1) -> (B, T).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (B, K): one reward per phase, got shape {tuple(rewards.shape)}")
    B, K = rewards.shape
    if phase_masks.dim() != 3 or phase_masks.shape[:2] != (B, K) or phase_masks.dtype != torch.bool:
        raise ValueError(f"phase_masks must be a bool tensor (B, K, T) = ({B}, {K}, T), got {tuple(phase_masks.shape)} {phase_masks.dtype}")
    if weights is not None and (weights.dim() != 1 or weights.shape[0] != K):
        raise ValueError(f"weights must be (K,) = ({K},), one λ per phase, got shape {tuple(weights.shape)}")
    if scale not in ("group", "none"):
        raise ValueError(f"scale must be 'group' (GRPO) or 'none' (Dr.GRPO), got {scale!r}")
    G = check_groups(rewards, group_ids)  # num_groups = B: ids in [0, B)
    # All K phases in one call: phase k's rows get group ids offset by k·G, so groups never mix across phases.
    flat_ids = (group_ids[None, :] + G * torch.arange(K, device=group_ids.device)[:, None]).reshape(-1)  # (K·B,)
    adv = grpo(rewards.T.reshape(-1).contiguous(), flat_ids, scale=scale, eps=eps, num_groups=K * G).view(K, B).T  # (B, K)
    if weights is not None:
        adv = adv * weights.to(adv)[None, :]
    m = phase_masks.to(adv.dtype)  # (B, K, T)
    if phase_normalise:
        m = m / phase_masks.sum(2, keepdim=True).clamp(min=1).to(adv.dtype)  # (B, K, T) 1/|m^k_i| on phase k
    return (adv[:, :, None] * m).sum(1)  # (B, T)


class FactorisedGRPO(AdvantageEstimator):
    """F-GRPO advantages from a RolloutBatch (see :func:`factorised_advantages`).

    Reads the K per-phase rewards from ``batch.reward_components`` (the module's reward functions, in phase
    order) and where each phase starts from ``batch.phase_starts`` (B, K) (token indices into the completion,
    filled by the domain).

    Args:
        weights: λ_k per phase (default all 1; F-GRPO's λ = 1 for the ranking phase).
        scale: "none" (Dr.GRPO centring, the paper's choice) or "group" (also divide by the group std).
        phase_normalise: weight phase tokens by 1/|m^k_i| (pair with ``aggregation: seq_mean_token_sum``).
        swap_phases: give phase k the advantage of phase K−1−k (the swapped-mask sanity arm; should be worse).
        eps: added to the std when ``scale="group"``.
    """

    min_group_size = 2  # group-centred per phase: a group of one has advantage 0

    requires = ("phase_starts",)

    def __init__(
        self,
        weights: Sequence[float] | None = None,
        scale: Literal["group", "none"] = "none",
        phase_normalise: bool = True,
        swap_phases: bool = False,
        eps: float = 1e-6,
    ):
        if scale not in ("group", "none"):
            raise ValueError(f"scale must be 'group' or 'none', got {scale!r}")
        if weights is not None and any(w < 0 for w in weights):
            raise ValueError(f"weights must be >= 0 (one λ per phase), got {list(weights)}")
        self.weights = None if weights is None else torch.tensor(list(weights), dtype=torch.float32)
        self.scale, self.phase_normalise, self.swap_phases, self.eps = scale, phase_normalise, swap_phases, eps

    def __call__(self, batch: RolloutBatch) -> Tensor:  # (B, T)
        batch.require("FactorisedGRPO", "reward_components", "phase_starts")
        starts = batch.phase_starts.to(batch.completion_mask.device)  # (B, K)
        rewards = batch.reward_components.to(batch.completion_mask.device)  # (B, K)
        if starts.shape != rewards.shape:
            raise ValueError(f"phase_starts {tuple(starts.shape)} and reward_components {tuple(rewards.shape)} must both be (B, K)")
        masks = span_masks(starts, batch.completion_mask)  # (B, K, T)
        if self.swap_phases:
            masks = masks.flip(1)
        return factorised_advantages(rewards, masks, batch.group_ids, weights=self.weights, scale=self.scale,
                                     phase_normalise=self.phase_normalise, eps=self.eps)
