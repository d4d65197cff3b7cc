"""SDPO: Self-Distillation Policy Optimization ("Reinforcement Learning via Self-Distillation", arXiv 2601.20802;
authors' code github.com/lasgroup/SDPO, ``verl/trainer/ppo/core_algos.py::compute_self_distillation_loss``).

The same model, re-prompted with privileged context (a successful sibling's answer), re-scores the student's own
rollout; the student matches this self-teacher's next-token distributions along its trajectory (the teacher never
generates). The teacher is an EMA of the student. Notation: P = student π_θ(·|x, y_<t), Q = teacher π_θ̄(·|x̃, y_<t).

    top-k:   K indices = the STUDENT's top-k tokens at each position; both distributions gathered there, plus a
             tail bucket log(1 − Σ_k p_k) (or renormalised over the K tokens, ``add_tail=False``)
    D_α:     α = 0: KL(Q ‖ P) (forward);  α = 1: KL(P ‖ Q) (reverse);
             else (1 − α)·KL(P ‖ M) + α·KL(Q ‖ M),  M = (1 − α)P + αQ          (generalised JSD; α = 0.5 = JSD)
    weight:  w_it = min(exp(ℓ_it − ℓ^old_it), is_clip), detached                  (token IS correction)
    loss:    Σ_{i,t} m_it·h_i·w_it·D_α,it / Σ_{i,t} m_it·h_i                     h_i = 1 iff row i has a teacher
    EMA:     θ̄ ← (1 − η)·θ̄ + η·θ after every update                               (η = 0.05)

The loss replaces the policy-gradient loss entirely (the code's ``loss_mode=sdpo``); GRPO advantages are computed
but unused. A batch with no teacher row gives loss 0 (``empty_target_batch`` = 1), never NaN.

Micro-batches: the token-mean's denominator Σ m·h is taken per micro-batch and rescaled by the micro-batch's share
of the optimiser batch's tokens, (Σ_micro m)/(Σ m); exact with one micro-batch per minibatch
(``micro_batch_size`` = None), and whenever every micro-batch has the same fraction of teacher tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.losses.aggregate import Normaliser
from common.losses.base import LossOutput, PolicyLoss, check_token_shapes
from common.ops import MAX_LOG_RATIO, masked_sum

if TYPE_CHECKING:
    from common.batch import RolloutBatch

# log ρ is clamped before exp() in the IS weight at ±20 as in the authors' code (twice the library's bound)
_MAX_LOG_RATIO = 2 * MAX_LOG_RATIO
# log Σ_k p_k is clamped below 0 so the tail log(1 − Σ p) stays finite (authors' code: −1e-7)
_MAX_LOG_TOPK_MASS = -1e-7


def topk_with_tail(logp: Tensor, index: Tensor, *, add_tail: bool = True) -> Tensor:
    """Log-probs at ``index`` plus the tail bucket log(1 − Σ_k p_k) (or renormalised over the K tokens).

    Shapes: logp (..., V) normalised log-probs, index (..., K) long -> (..., K + 1) with the tail, (..., K) without.
    The result is a normalised distribution over its last dimension.
    """
    if index.shape[:-1] != logp.shape[:-1]:
        raise ValueError(f"index {tuple(index.shape)} must match logp {tuple(logp.shape)} in all but the last dimension")
    top = logp.gather(-1, index)  # (..., K)
    if not add_tail:
        return top - torch.logsumexp(top, dim=-1, keepdim=True)
    log_mass = torch.logsumexp(top, dim=-1, keepdim=True).clamp(max=_MAX_LOG_TOPK_MASS)  # (..., 1)
    return torch.cat([top, torch.log(-torch.expm1(log_mass))], dim=-1)


def generalized_jsd(student: Tensor, teacher: Tensor, alpha: float = 0.5) -> Tensor:
    """D_α between the student P and the teacher Q, both normalised log-probs over the last dimension
    (module docstring). Shapes: (..., C), (..., C) -> (...)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the same shape")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)  # KL(Q ‖ P)
    if alpha == 1.0:
        return F.kl_div(teacher, student, reduction="none", log_target=True).sum(-1)  # KL(P ‖ Q)
    a = torch.tensor(alpha, dtype=student.dtype, device=student.device)
    mixture = torch.logsumexp(torch.stack([student + torch.log1p(-a), teacher + torch.log(a)]), dim=0)  # log M
    kl_p = F.kl_div(mixture, student, reduction="none", log_target=True).sum(-1)  # KL(P ‖ M)
    kl_q = F.kl_div(mixture, teacher, reduction="none", log_target=True).sum(-1)  # KL(Q ‖ M)
    return (1.0 - alpha) * kl_p + alpha * kl_q


def is_weight(logprobs: Tensor, old_logprobs: Tensor, is_clip: float | None) -> Tensor:
    """w = min(exp(ℓ − ℓ^old), is_clip), detached; 1 when ``is_clip`` is None. Shapes: (B, T) -> (B, T)."""
    if is_clip is None:
        return torch.ones_like(logprobs)
    log_ratio = (logprobs - old_logprobs).detach().clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(log_ratio).clamp(max=is_clip)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, rate: float) -> None:
    """θ̄ ← (1 − η)·θ̄ + η·θ over matching parameters (in place). η = 1 copies the student."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameters, student {len(s_params)}; they must match")
    for t, s in zip(t_params, s_params):  # ok: a loop over parameter tensors, once per training step
        t.lerp_(s.detach(), rate)


@dataclass
class Distillation:
    """What a self-distillation loss needs beyond log-probs (built by the module from one policy forward).

    student: (B, T, C) normalised student log-probs over the C = K (+ tail) categories, with gradient.
    teacher: (B, T, C) the teacher's log-probs over the same categories (no gradient).
    teacher_entropy: (B, T) entropy of the teacher's full next-token distribution (SRPO's confidence weight).
    has_teacher: (B,) bool, h_i: row i has privileged context (a successful sibling).
    """

    student: Tensor
    teacher: Tensor
    teacher_entropy: Tensor
    has_teacher: Tensor


class SDPOLoss(PolicyLoss):
    """The SDPO token-mean distillation loss (module docstring). ``distill`` comes from the method part
    ``text_reasoning.self_distill.SelfDistillation`` (its ``loss_inputs``: the top-k distributions from the policy
    forward and the EMA teacher); without it the loss raises.

    Args:
        alpha: α of the generalised JSD (code 0.5; 0 forward KL, 1 reverse KL).
        top_k: K, the student's top-k tokens per position (code 100).
        add_tail: append the tail bucket (code default) instead of renormalising over the K tokens.
        is_clip: cap of the token importance weight min(ρ, is_clip) (code 2); None = no weight.
    """

    def __init__(self, alpha: float = 0.5, top_k: int = 100, add_tail: bool = True, is_clip: float | None = 2.0):
        problems = []
        if not 0.0 <= alpha <= 1.0:
            problems.append(f"alpha must be in [0, 1], got {alpha}")
        if not isinstance(top_k, int) or top_k < 1:
            problems.append(f"top_k must be a positive integer, got {top_k!r}")
        if is_clip is not None and not is_clip > 0:
            problems.append(f"is_clip must be > 0 or None, got {is_clip}")
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))
        self.alpha, self.top_k, self.add_tail, self.is_clip = alpha, top_k, add_tail, is_clip

    def _check(self, distill: Distillation | None, mask: Tensor) -> None:
        if distill is None:
            raise ValueError(f"{type(self).__name__} needs distill= (the teacher's distributions): list "
                             "text_reasoning.self_distill.SelfDistillation in the module's methods")
        B, T = mask.shape
        if distill.student.shape[:2] != (B, T) or distill.student.shape != distill.teacher.shape:
            raise ValueError(f"distill.student {tuple(distill.student.shape)} and distill.teacher "
                             f"{tuple(distill.teacher.shape)} must both be (B, T, C) with B, T = {B}, {T}")
        if distill.has_teacher.shape != (B,) or distill.has_teacher.dtype != torch.bool:
            raise ValueError(f"distill.has_teacher must be a bool (B,) = ({B},), got {distill.has_teacher.dtype} "
                             f"{tuple(distill.has_teacher.shape)}")
        if distill.teacher_entropy.shape != (B, T):
            raise ValueError(f"distill.teacher_entropy must be (B, T) = ({B}, {T}), got {tuple(distill.teacher_entropy.shape)}")

    def token_loss(self, logprobs: Tensor, old_logprobs: Tensor, distill: Distillation) -> Tensor:
        """w·D_α per token. Shapes: (B, T), (B, T) -> (B, T)."""
        D = generalized_jsd(distill.student, distill.teacher, self.alpha)  # (B, T)
        return is_weight(logprobs, old_logprobs, self.is_clip) * D

    def __call__(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                 ref_logprobs: Tensor | None = None, entropy: Tensor | None = None,
                 normaliser: Normaliser | None = None, batch: "RolloutBatch | None" = None,
                 distill: Distillation | None = None) -> LossOutput:
        """Shapes: logprobs, old_logprobs, mask (B, T); ``distill`` as in :class:`Distillation`."""
        check_token_shapes(logprobs, old_logprobs, mask)
        self._check(distill, mask)
        norm = normaliser if normaliser is not None else Normaliser.of(mask)
        m = mask & distill.has_teacher[:, None]  # (B, T) tokens of rows with a teacher
        per_token = self.token_loss(logprobs, old_logprobs, distill)  # (B, T)
        share = mask.sum() / norm.num_tokens  # () this micro-batch's share of the optimiser batch's tokens
        loss = masked_sum(per_token, m) / m.sum().clamp(min=1) * share
        metrics = {
            "distill_loss": loss.detach(),
            "teacher_frac": distill.has_teacher.float().mean().detach() * share,
            "empty_target_batch": (~distill.has_teacher.any()).float() * share,
            "teacher_entropy": masked_sum(distill.teacher_entropy, mask).detach() / norm.num_tokens,
        }
        if entropy is not None:
            metrics["entropy"] = masked_sum(entropy, mask).detach() / norm.num_tokens
        return LossOutput(loss=loss, metrics=metrics)
