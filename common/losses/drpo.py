"""DRPO: Decoupled Reward Policy Optimization for efficient reasoning (arXiv 2510.04474; code
github.com/Optimization-AI/DRPO, ``verl/verl/trainer/ppo/core_algos.py::compute_policy_loss_drpo``).

A length penalty in the reward makes GRPO give negative advantage to correct-but-long answers. DRPO
normalises the length signal among the *correct* rollouts of a group only (every correct rollout keeps a
positive weight) and treats the wrong ones with a separate discriminative term (paper eq. 7):

Notation (code -> paper): ``s`` -> s_θ(o, q) the mean token log-prob, ``u`` -> |o|/C, ``w`` -> the closed-form
weights of the optimal positive distribution P*(o|q) ∝ π_old(o|q)·exp(r_len(o)/λ), ``kl_old`` -> KL(π_old ‖ π_θ).

    s_i  = (1/L_i) Σ_t m_it ℓ_it                                          mean token log-prob, current policy
    w_i  = exp((1 − L_i/C)/λ) / Σ_{j∈P_k} exp((1 − L_j/C)/λ)               i ∈ P_k (correct rows of group k)
    J_k  = Σ_{i∈P_k} w_i s_i − τ·log( (1/|N_k|) Σ_{j∈N_k} exp(s_j/τ) )       only groups with |P_k| > 0, |N_k| > 0
    loss = −(1/K) Σ_k J_k + β·[K_old − δ]_+·K_old,   K_old = mean_tokens(ℓ^old − ℓ), the hinge factor detached

K counts every group, including those without both classes (they contribute 0). λ = inf gives uniform
weights (DisCO). There is no PPO ratio clip: the trust region is the KL penalty.

Deviations from the authors' code: the negative term is the log-mean-exp itself, so the loss value *is*
−objective + penalty (the code uses S/S.detach(), same gradient, a value that is not the objective); C is the
generation budget (``max_len``, default the normaliser's T_max) rather than the padded width; rows with no
valid token belong to neither class.

Micro-batches: a group must lie whole inside one micro-batch (the split is by rows, so choose
``micro_batch_size`` as a multiple of the group size; this cannot be checked from a micro-batch and is not).
The result is exact when ``micro_batch_size`` is None (one micro-batch per minibatch). With several
micro-batches, 1/K is taken as (1/K_micro)·(B'_micro/B'), exact when every group has the same number of
non-empty completions, and the KL hinge factor [K_old − δ]_+ uses the micro-batch's own K_old (as the
authors' verl code does per micro-batch).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from common.losses.aggregate import Normaliser
from common.losses.base import LossOutput, PolicyLoss, check_token_shapes
from common.ops import group_count, group_max, group_sum, masked_sum

if TYPE_CHECKING:
    from common.batch import RolloutBatch


def drpo_objective(logprobs: Tensor, mask: Tensor, positive: Tensor, group_ids: Tensor, *, lam: float = 0.1,
                   tau: float = 10.0, max_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group DRPO objective J_k (eq. 7 of arXiv 2510.04474; see the module docstring), with gradient.

    Shapes: logprobs, mask (B, T); positive (B,) bool; group_ids (B,) with ids in [0, B) ->
    ``(J (B,) per group slot, mixed (B,) bool per group slot, w (B,) per row: 0 off P)``.
    """
    B = logprobs.shape[0]
    L = mask.sum(1)  # (B,)
    valid = L > 0
    s = masked_sum(logprobs, mask, dim=1) / L.clamp(min=1).to(logprobs.dtype)  # (B,) mean token log-prob
    pos, neg = positive & valid, ~positive & valid  # (B,) each
    n_pos = group_sum(pos.to(s.dtype), group_ids, B)  # (K,)
    n_neg = group_sum(neg.to(s.dtype), group_ids, B)  # (K,)
    mixed = (n_pos > 0) & (n_neg > 0)  # (K,)
    # 1. closed-form positive weights: a softmax of (1 − L/C)/λ over the correct rows of the group (no grad)
    with torch.no_grad():
        z = (1.0 - L.to(s.dtype) / max_len) / lam if math.isfinite(lam) else torch.zeros_like(s)  # (B,)
        lowest = z.new_tensor(torch.finfo(z.dtype).min)
        zmax = group_max(torch.where(pos, z, lowest), group_ids, B)  # (K,) shift so every exp(.) <= 1
        e = torch.where(pos, torch.exp(torch.where(pos, z - zmax[group_ids], 0.0)), 0.0)  # (B,)
        w = e / group_sum(e, group_ids, B)[group_ids].clamp(min=torch.finfo(e.dtype).tiny)  # (B,)
    positive_term = group_sum(w * s, group_ids, B)  # (K,) Σ_P w_i s_i
    # 2. discriminative negative term: τ·log-mean-exp(s_j/τ) over the wrong rows, shifted by the group max
    x = s / tau  # (B,)
    with torch.no_grad():
        xmax = group_max(torch.where(neg, x, x.new_tensor(torch.finfo(x.dtype).min)), group_ids, B)  # (K,)
        xmax = torch.where(n_neg > 0, xmax, 0.0)  # groups without wrong rows: any finite shift
    # the inner where keeps exp() finite off N, so its backward never multiplies 0 by inf
    ex = torch.where(neg, torch.exp(torch.where(neg, x - xmax[group_ids], 0.0)), 0.0)  # (B,)
    lme = xmax + torch.log(group_sum(ex, group_ids, B).clamp(min=torch.finfo(x.dtype).tiny) / n_neg.clamp(min=1))  # (K,)
    J = torch.where(mixed, positive_term - tau * lme, torch.zeros_like(lme))  # (K,)
    return J, mixed, w


class DRPOLoss(PolicyLoss):
    """DRPO's decoupled objective plus its KL hinge penalty (see the module docstring).

    Correctness comes from ``batch.correct`` (the task verifier) when the module filled it, else from the
    rewards, which must then be exactly 0 or 1. The ``advantages`` argument is unused: DRPO needs no advantage
    estimator (any cheap one, e.g. GRPO, can stay configured for logging).

    Args:
        lam: λ, temperature of the length weights exp((1 − L/C)/λ) (code 0.1); ``.inf`` = uniform (DisCO).
        tau: τ, temperature of the negative log-mean-exp (code 10).
        beta: β, coefficient of the KL hinge penalty (code 1000).
        delta: δ, the KL budget below which the penalty is off (code 1e-4).
        max_len: C, the length normaliser; None = the generation budget ``sampling.max_new_tokens``.
    """

    def __init__(self, lam: float = 0.1, tau: float = 10.0, beta: float = 1000.0, delta: float = 1e-4,
                 max_len: int | None = None):
        problems = []
        if not lam > 0:
            problems.append(f"lam must be > 0 (or inf for uniform weights), got {lam}")
        if not (tau > 0 and math.isfinite(tau)):
            problems.append(f"tau must be a finite float > 0, got {tau}")
        if beta < 0:
            problems.append(f"beta must be >= 0, got {beta}")
        if delta < 0:
            problems.append(f"delta must be >= 0, got {delta}")
        if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
            problems.append(f"max_len must be a positive integer or None, got {max_len!r}")
        if problems:
            raise ValueError("DRPOLoss: " + "; ".join(problems))
        self.lam, self.tau, self.beta, self.delta, self.max_len = lam, tau, beta, delta, max_len

    @staticmethod
    def _positive(batch: "RolloutBatch | None", B: int, device: torch.device) -> Tensor:
        if batch is None or (batch.correct is None and batch.rewards is None):
            raise ValueError("DRPOLoss needs batch= with batch.correct or binary batch.rewards (B,) to split correct/wrong")
        if batch.correct is not None:
            positive = batch.correct.to(device=device, dtype=torch.bool)
        else:
            r = batch.rewards.to(device)
            if not bool(((r == 0) | (r == 1)).all()):
                raise ValueError("DRPOLoss: batch.rewards must be exactly 0 or 1 when batch.correct is None; "
                                 "set the task verifier (batch.correct) or use a binary reward")
            positive = r == 1
        if positive.shape != (B,):
            raise ValueError(f"batch.correct/rewards must be (B,) = ({B},), got {tuple(positive.shape)}")
        return positive

    def __call__(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                 ref_logprobs: Tensor | None = None, entropy: Tensor | None = None,
                 normaliser: Normaliser | None = None, batch: "RolloutBatch | None" = None) -> LossOutput:
        """Shapes: logprobs, old_logprobs, mask (B, T); ``batch`` the same B rows (group ids, correctness)."""
        check_token_shapes(logprobs, old_logprobs, mask)
        B = logprobs.shape[0]
        positive = self._positive(batch, B, logprobs.device)
        norm = normaliser if normaliser is not None else Normaliser.of(mask)
        C = self.max_len if self.max_len is not None else norm.max_len
        _, local_ids = torch.unique(batch.group_ids.to(logprobs.device), return_inverse=True)  # (B,) in [0, K_micro)
        J, mixed, w = drpo_objective(logprobs, mask, positive, local_ids, lam=self.lam, tau=self.tau, max_len=C)
        K_micro = (group_count(local_ids, B) > 0).sum()  # () groups in this micro-batch
        nonempty = mask.any(1).sum().clamp(min=1)  # () B'_micro
        share = nonempty / (K_micro.clamp(min=1) * norm.num_sequences)  # 1/K as (1/K_micro)(B'_micro/B')
        objective = J.sum() * share  # () contribution to (1/K) Σ_k J_k
        kl_tok = masked_sum(old_logprobs - logprobs, mask)  # () Σ over this micro-batch's tokens
        kl = kl_tok / norm.num_tokens  # () contribution to K_old of the optimiser batch
        hinge = (self.beta * (kl_tok / mask.sum().clamp(min=1) - self.delta).clamp(min=0)).detach()  # ()
        loss = -objective + hinge * kl
        metrics = {
            "objective": objective.detach(),
            "kl_penalty": (hinge * kl).detach(),
            "kl": kl.detach(),
            "mixed_group_frac": mixed.sum().detach() * share,
        }
        if entropy is not None:
            metrics["entropy"] = masked_sum(entropy, mask).detach() / norm.num_tokens
        return LossOutput(loss=loss, metrics=metrics)
