"""Direct Advantage Policy Optimization, step level (Skywork; arXiv 2412.18279). Not ByteDance's DAPO (§3).

An offline critic V_φ(s) estimates the probability that a partial solution s = (x, a_1..a_{k−1}) ends correct;
each candidate step a (a line of a completion sampled from π_ref) gets the step advantage

    A(s, a) = V_φ(s ⊕ a) − V_φ(s)          (terminal step: r − V_φ(s))

and the actor regresses its log-ratio to the reference on A/β:

    L(θ) = E_s E_{a∼π_ref(·|s)} [ ( log π_θ(a|s) − log π_ref(a|s) − A(s, a)/β )² ]

log π(a|s) = Σ_t log π(a_t | s, a_<t) over the step's tokens. The minimiser over a free policy is
π ∝ π_ref·exp(A/β) up to log Z(s) = log E_{π_ref} exp(A/β), which the loss ignores (O(A²/β²) when E_{π_ref}[A] ≈ 0).
Each row of the batch is one (s, a) pair: the prompt holds x and the previous steps, the completion holds a.
The exact scaling and normalisation of the paper's loss are not verified (shared/methods/text.md §22): here the
squared error is averaged over the optimiser batch's steps (rows with at least one token).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from common.losses.base import LossOutput, PolicyLoss, check_token_shapes
from common.ops import masked_sum

if TYPE_CHECKING:
    from common.batch import RolloutBatch
    from common.losses.aggregate import Normaliser


def direct_advantage_loss(step_logprobs: Tensor, step_ref_logprobs: Tensor, advantages: Tensor, beta: float) -> Tensor:
    """Per-step squared error (log π(a|s) − log π_ref(a|s) − A/β)². Shapes: (N,), (N,), (N,) -> (N,)."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if step_logprobs.shape != step_ref_logprobs.shape or step_logprobs.shape != advantages.shape or advantages.dim() != 1:
        raise ValueError(f"step_logprobs {tuple(step_logprobs.shape)}, step_ref_logprobs {tuple(step_ref_logprobs.shape)} "
                         f"and advantages {tuple(advantages.shape)} must all be (N,): one value per step")
    return (step_logprobs - step_ref_logprobs - advantages / beta).pow(2)  # (N,)


class DirectAdvantageLoss(PolicyLoss):
    """The step-level DAPO actor loss for the shared update loop: one row per (state, step) pair, sequence-level
    advantages ``A (B,)`` from the offline critic, reference log-probs from the module.

    Args:
        beta: β, the KL-regularisation strength; the fitted log-ratio is A/β (paper value not verified).
    """

    def __init__(self, beta: float = 1.0):
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta = beta

    @property
    def needs_reference(self) -> bool:
        return True

    def __call__(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                 ref_logprobs: Tensor | None = None, entropy: Tensor | None = None,
                 normaliser: "Normaliser | None" = None, batch: "RolloutBatch | None" = None) -> LossOutput:
        check_token_shapes(logprobs, old_logprobs, mask)
        if ref_logprobs is None or ref_logprobs.shape != logprobs.shape:
            raise ValueError(f"ref_logprobs must be (B, T) = {tuple(logprobs.shape)}, got "
                             f"{None if ref_logprobs is None else tuple(ref_logprobs.shape)}")
        if advantages.dim() != 1 or advantages.shape[0] != logprobs.shape[0]:
            raise ValueError(f"advantages must be one value per step (B,) with B = {logprobs.shape[0]}, got {tuple(advantages.shape)}")
        has_tokens = mask.any(1)  # (B,) an empty step contributes nothing
        step_lp = masked_sum(logprobs, mask, dim=1)  # (B,) log π(a|s)
        step_ref = masked_sum(ref_logprobs, mask, dim=1)  # (B,) log π_ref(a|s)
        per_step = direct_advantage_loss(step_lp, step_ref, advantages.to(step_lp.dtype), self.beta) * has_tokens  # (B,)
        count = normaliser.num_sequences if normaliser is not None else has_tokens.sum().clamp(min=1).float()
        log_ratio = (step_lp - step_ref).detach() * has_tokens
        return LossOutput(loss=per_step.sum() / count, metrics={
            "log_ratio": log_ratio.sum() / count,
            "target": (advantages.detach() / self.beta * has_tokens).sum() / count,
            "fit_error": per_step.detach().sum() / count,
        })
