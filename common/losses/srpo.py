"""SRPO: Sample-Routed Policy Optimization — GRPO for correct samples, entropy-weighted SDPO for failed ones
(arXiv 2604.02288, §3; no official code found).

SDPO learns fast early but degrades: distilling a *correct* sample toward a sibling's different-but-correct
solution is ambiguous, and the self-teacher grows less confident over training. SRPO routes each rollout:

    c_i = 1[y_i correct],  h_i = 1[teacher information for y_i]                                   (B,)
    z_i^SDPO = (1 − c_i)·h_i,   z_i^GRPO = 1 − z_i^SDPO
    ℓ^GRPO_it = max(−A_i ρ_it, −A_i clip(ρ_it, 1 − ε_low, 1 + ε_high))     A from ALL G rollouts of the group
    w̃_it = exp(−β H_it),  H_it = entropy of the teacher's next-token distribution
    w_it = w̃_it / ((1/|Ω|) Σ_{(j,s) ∈ Ω} w̃_js),   Ω = valid tokens of SDPO-routed rows
    L = [ Σ m z^GRPO ℓ^GRPO + Σ m z^SDPO w ℓ^SDPO ] / Σ m (z^GRPO + z^SDPO)         (ℓ^SDPO: SDPO's token loss)

The denominator is every valid token (z^GRPO + z^SDPO = 1). Ω empty: no normalisation (no 0/0); β = 0: w ≡ 1.
An all-correct batch gives exactly the token-mean clipped GRPO loss. H is the full-vocabulary teacher entropy (the
paper writes −Σ_v q log q; whether it uses the full vocabulary or the top-k is unverified).

Micro-batches: the mean of w̃ over Ω is taken over the micro-batch's Ω (exact with one micro-batch per minibatch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from common.losses.aggregate import Normaliser
from common.losses.base import LossOutput, check_token_shapes
from common.losses.ppo_clip import clipped_surrogate
from common.losses.self_distill import Distillation, SDPOLoss
from common.ops import masked_sum

if TYPE_CHECKING:
    from common.batch import RolloutBatch


def srpo_routes(correct: Tensor, has_teacher: Tensor) -> Tensor:
    """z^SDPO = (1 − c)·h: failed rollouts with a teacher go to SDPO, everything else to GRPO.
    Shapes: (B,) bool, (B,) bool -> (B,) bool."""
    if correct.shape != has_teacher.shape or correct.dim() != 1:
        raise ValueError(f"correct {tuple(correct.shape)} and has_teacher {tuple(has_teacher.shape)} must both be (B,)")
    return ~correct.bool() & has_teacher.bool()


def entropy_weights(teacher_entropy: Tensor, omega: Tensor, beta: float = 1.0) -> Tensor:
    """w = exp(−βH) / mean_Ω exp(−βH), 0 off Ω; Ω empty -> all 0. Shapes: (B, T), (B, T) bool -> (B, T)."""
    if teacher_entropy.shape != omega.shape:
        raise ValueError(f"teacher_entropy {tuple(teacher_entropy.shape)} and omega {tuple(omega.shape)} must match (B, T)")
    w = torch.exp(-beta * teacher_entropy.detach())  # (B, T)
    mean = masked_sum(w, omega) / omega.sum().clamp(min=1)  # ()
    return torch.where(omega, w / mean.clamp(min=torch.finfo(w.dtype).tiny), torch.zeros_like(w))


class SRPOLoss(SDPOLoss):
    """SRPO's routed loss (module docstring); correctness from ``batch.correct`` (the task verifier).

    Args:
        beta: β of the teacher-confidence weight exp(−βH) (paper 1; 0 = plain SDPO on failures).
        eps_low: lower clip of the GRPO branch (0.2).
        eps_high: upper clip of the GRPO branch (paper's "strengthened GRPO" uses clip-higher; 0.28 as DAPO).
        alpha, top_k, add_tail, is_clip: the SDPO branch (see :class:`common.losses.self_distill.SDPOLoss`).
    """

    requires = ("correct",)

    def __init__(self, beta: float = 1.0, eps_low: float = 0.2, eps_high: float = 0.28, alpha: float = 0.5,
                 top_k: int = 100, add_tail: bool = True, is_clip: float | None = 2.0):
        super().__init__(alpha=alpha, top_k=top_k, add_tail=add_tail, is_clip=is_clip)
        problems = []
        if beta < 0:
            problems.append(f"beta must be >= 0, got {beta}")
        if not 0 <= eps_low < 1:
            problems.append(f"eps_low must be in [0, 1), got {eps_low}")
        if eps_high < 0:
            problems.append(f"eps_high must be >= 0, got {eps_high}")
        if problems:
            raise ValueError("SRPOLoss: " + "; ".join(problems))
        self.beta, self.eps_low, self.eps_high = beta, eps_low, eps_high

    def __call__(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                 ref_logprobs: Tensor | None = None, entropy: Tensor | None = None,
                 normaliser: Normaliser | None = None, batch: "RolloutBatch | None" = None,
                 distill: Distillation | None = None) -> LossOutput:
        """Shapes: logprobs, old_logprobs, mask (B, T); advantages (B,) or (B, T); ``batch.correct`` (B,)."""
        check_token_shapes(logprobs, old_logprobs, mask)
        self._check(distill, mask)
        if batch is None or batch.correct is None or batch.correct.shape != mask.shape[:1]:
            raise ValueError(f"SRPOLoss needs batch= with batch.correct (B,) = ({mask.shape[0]},) from the task verifier "
                             "to route correct samples to GRPO")
        norm = normaliser if normaliser is not None else Normaliser.of(mask)
        to_sdpo = srpo_routes(batch.correct.to(mask.device), distill.has_teacher)  # (B,)
        omega = mask & to_sdpo[:, None]  # (B, T) Ω
        grpo_tokens = mask & ~to_sdpo[:, None]  # (B, T)
        pg, _, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, mask,
                                           eps_low=self.eps_low, eps_high=self.eps_high)  # (B, T)
        w = entropy_weights(distill.teacher_entropy, omega, self.beta)  # (B, T)
        sd = w * self.token_loss(logprobs, old_logprobs, distill)  # (B, T)
        grpo_sum, sdpo_sum = masked_sum(pg, grpo_tokens), masked_sum(sd, omega)
        loss = (grpo_sum + sdpo_sum) / norm.num_tokens
        metrics = {
            "grpo_loss": grpo_sum.detach() / norm.num_tokens,
            "distill_loss": sdpo_sum.detach() / norm.num_tokens,
            "sdpo_frac": omega.sum().float() / norm.num_tokens,  # routed tokens, a share of all
            "clip_frac": masked_sum(clipped.float(), grpo_tokens) / norm.num_tokens,
            "teacher_entropy": masked_sum(distill.teacher_entropy, mask).detach() / norm.num_tokens,
        }
        if entropy is not None:
            metrics["entropy"] = masked_sum(entropy, mask).detach() / norm.num_tokens
        return LossOutput(loss=loss, metrics=metrics)
