"""D³S: Dynamic Dual-Level Down-Sampling ("Learning More with Less: A Dynamic Dual-Level Down-Sampling Framework
for Efficient Policy Optimization", arXiv 2509.22115).

Sample level: from the whole rollout batch (across groups) keep the N_t rollouts whose advantages have the largest
variance; the paper bounds the policy-gradient norm from above by a term growing with Var(A) of the kept subset.
Among subsets of a fixed size the variance is maximised by "extremes" (the j smallest and N − j largest values),
so with A sorted ascending (a_(1) ≤ ... ≤ a_(B))

    S_j = {a_(1), ..., a_(j)} ∪ {a_(B−N+j+1), ..., a_(B)},   j = 0..N
    S*  = argmax_j Var(S_j)                                  (unbiased variance; O(B log B) by prefix sums)

Token level: within the kept rollouts, only the top ⌈K_t · #valid⌉ tokens by ``score_it = |A_it| · H_it`` (H the
policy's token entropy, no gradient) enter the clipped surrogate, averaged over the kept tokens (token-mean over m').

Schedule (a curriculum that starts aggressive and relaxes, linear over ``warmup_steps`` = T_s):

    N_t = ⌈(n_init + (n_final − n_init) · min(1, t/T_s)) · B⌉,   K_t = k_init + (k_final − k_init) · min(1, t/T_s)

Unverified details (shared/methods/text.md §9, §26): the schedule's values (the proposal 25% → 100% of rollouts,
20% → 100% of tokens over the first half of training is used), batch-global vs per-sequence top-K (global here,
over the loss's micro-batch: set ``micro_batch_size`` to the rollout size to make it the whole batch), and the
aggregation (token-mean over the kept tokens). Sequence advantages of a (B, T) estimator are their masked means.
"""

from __future__ import annotations

import math
import torch
from torch import Tensor, nn

from common.batch import RolloutBatch
from common.losses.aggregate import Aggregation, Normaliser
from common.losses.base import LossOutput
from common.losses.kl import KLEstimator
from common.losses.ppo_clip import ClippedPolicyLoss
from common.ops import masked_mean
from common.sampling.base import Selector


def linear_schedule(start: float, end: float, step: int | Tensor, warmup_steps: int) -> float | Tensor:
    """``start + (end − start) · min(1, step / warmup_steps)``; ``warmup_steps`` 0 gives ``end`` at once."""
    if warmup_steps <= 0:
        return end
    frac = min(1.0, step / warmup_steps) if not torch.is_tensor(step) else (step / warmup_steps).clamp(max=1.0)
    return start + (end - start) * frac


def max_variance_subset(advantages: Tensor, n: int) -> Tensor:
    """The ``n`` rows whose advantages have the largest variance (D³S sample level, arXiv 2509.22115).

    Sort ascending (stable: ties keep their row order), evaluate every "extremes" subset S_j (j smallest plus
    n − j largest) with prefix sums in float64, keep the first j of maximal unbiased variance.
    Shapes: advantages (B,) -> keep (B,) bool with exactly min(n, B) True.
    """
    if not torch.is_tensor(advantages) or advantages.dim() != 1 or not advantages.is_floating_point():
        raise ValueError(f"advantages must be a 1-D floating tensor (B,), got {getattr(advantages, 'shape', advantages)}")
    if n < 1:
        raise ValueError(f"n (rows to keep) must be >= 1, got {n}")
    B = advantages.shape[0]
    n = min(n, B)
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=advantages.device)
    a, order = torch.sort(advantages.detach().double(), stable=True)  # (B,), (B,)
    zero = a.new_zeros(1)
    c1 = torch.cat([zero, a.cumsum(0)])  # (B + 1,) prefix sums
    c2 = torch.cat([zero, (a * a).cumsum(0)])  # (B + 1,) prefix sums of squares
    j = torch.arange(n + 1, device=a.device)  # (n + 1,) how many from the bottom
    s1 = c1[j] + c1[B] - c1[B - n + j]  # (n + 1,) Σ over S_j
    s2 = c2[j] + c2[B] - c2[B - n + j]  # (n + 1,) Σ of squares over S_j
    var = (s2 - s1 * s1 / n) / max(n - 1, 1)  # (n + 1,) unbiased variance of S_j
    best = torch.argmax(var)  # () first maximiser
    pos = torch.arange(B, device=a.device)  # (B,) positions in sorted order
    in_sorted = (pos < best) | (pos >= B - n + best)  # (B,)
    return torch.zeros(B, dtype=torch.bool, device=advantages.device).scatter(0, order, in_sorted)


def top_score_tokens(score: Tensor, mask: Tensor, frac: float | Tensor) -> Tensor:
    """The ``⌈frac · N⌉`` valid tokens with the largest score (N = valid tokens), ties broken by position.

    Reference: ``rank of score_it among valid tokens (descending, stable) < ⌈frac · N⌉``. No host sync.
    Shapes: score, mask (B, T) -> (B, T) bool.
    """
    if score.shape != mask.shape or mask.dim() != 2:
        raise ValueError(f"score {tuple(score.shape)} and mask {tuple(mask.shape)} must both be (B, T)")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (B, T), got {mask.dtype}")
    flat = score.detach().double().masked_fill(~mask, -torch.inf).flatten()  # (B·T,)
    order = torch.sort(flat, descending=True, stable=True).indices  # (B·T,)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(flat.numel(), device=flat.device))  # (B·T,)
    k = torch.ceil(torch.as_tensor(frac, dtype=torch.float64) * mask.sum().double())  # ()
    return mask & (rank.view(mask.shape) < k)


def _sequence_advantages(batch: RolloutBatch) -> Tensor:  # (B,)
    if batch.advantages is None:
        raise ValueError("D3SSampleSelector needs RolloutBatch.advantages; it runs after the advantage estimator")
    a = batch.advantages
    return a if a.dim() == 1 else masked_mean(a, batch.completion_mask, 1)


class D3SSampleSelector(nn.Module, Selector):
    """D³S sample-level down-sampling (arXiv 2509.22115): keep the ⌈n_t·B⌉ rollouts of maximal Var(A).

    Advantages are computed on the full groups first (the module's estimator); this selector only chooses rows.
    A step whose advantages are all zero trains on nothing (the module takes an empty optimiser step and logs
    ``train/empty_steps``). The schedule position is a buffer counting training steps (one ``finalize`` per
    step), so it is in the checkpoint.

    Args:
        n_init: fraction of the batch's rollouts kept at step 0 (proposal 0.25; paper value unpublished).
        n_final: fraction kept from ``warmup_steps`` on (1.0 = no sample down-sampling).
        warmup_steps: T_s, steps of the linear relaxation (0 = ``n_final`` throughout).
    """

    def __init__(self, n_init: float = 0.25, n_final: float = 1.0, warmup_steps: int = 100):
        problems = [f"{name} must be in (0, 1], got {v}" for name, v in (("n_init", n_init), ("n_final", n_final))
                    if not 0 < v <= 1]
        if warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {warmup_steps}")
        if problems:
            raise ValueError("D3SSampleSelector: " + "; ".join(problems))
        super().__init__()
        self.n_init, self.n_final, self.warmup_steps = n_init, n_final, warmup_steps
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def fraction(self) -> float:
        return float(linear_schedule(self.n_init, self.n_final, int(self.step), self.warmup_steps))  # ok: once per step

    def __call__(self, rollouts: RolloutBatch) -> RolloutBatch:
        adv = _sequence_advantages(rollouts)  # (B,)
        B = rollouts.batch_size
        n = max(1, math.ceil(self.fraction() * B - 1e-9))
        keep = max_variance_subset(adv, n) & bool((adv != 0).any())  # all zero -> nothing (one sync per step)
        kept = rollouts.select(keep)
        _, inverse = torch.unique(kept.group_ids, return_inverse=True)  # renumber kept groups 0..k−1
        return kept.replace(group_ids=inverse.to(kept.group_ids.dtype))

    def finalize(self, kept: RolloutBatch) -> RolloutBatch:
        self.step += 1
        return kept


class D3STokenLoss(ClippedPolicyLoss):
    """D³S token-level down-sampling (arXiv 2509.22115): the clipped surrogate on the top ⌈K_t·N⌉ tokens by
    ``|A_it|·H_it``, token-mean over the kept tokens m'. KL and entropy terms, if on, are over m' too.

    The selection is over the micro-batch the loss sees; the denominator is ⌈K_t·N_minibatch⌉, the kept count of
    the whole optimiser minibatch (exact when the micro-batch is the minibatch). K_t follows the global step.

    Args:
        k_init: fraction of valid tokens kept at step 0 (proposal 0.2; the paper reports < 20% of GRPO's tokens).
        k_final: fraction kept from ``warmup_steps`` on.
        warmup_steps: T_s of the linear schedule (0 = ``k_final`` throughout).
        eps_low, eps_high, dual_clip, aggregation, beta, kl_estimator, entropy_coef: as in ClippedPolicyLoss.
    """

    def __init__(self, k_init: float = 0.2, k_final: float = 1.0, warmup_steps: int = 100, eps_low: float = 0.2,
                 eps_high: float = 0.2, dual_clip: float | None = None, aggregation: Aggregation = "token_mean",
                 beta: float = 0.0, kl_estimator: KLEstimator = "k3", entropy_coef: float = 0.0):
        problems = [f"{name} must be in (0, 1], got {v}" for name, v in (("k_init", k_init), ("k_final", k_final))
                    if not 0 < v <= 1]
        if warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {warmup_steps}")
        if problems:
            raise ValueError("D3STokenLoss: " + "; ".join(problems))
        super().__init__(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, aggregation=aggregation,
                         beta=beta, kl_estimator=kl_estimator, entropy_coef=entropy_coef)
        self.k_init, self.k_final, self.warmup_steps = k_init, k_final, warmup_steps
        self.k = float(linear_schedule(k_init, k_final, 0, warmup_steps))

    def set_step(self, global_step: int) -> None:
        self.k = float(linear_schedule(self.k_init, self.k_final, int(global_step), self.warmup_steps))

    def __call__(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                 ref_logprobs: Tensor | None = None, entropy: Tensor | None = None,
                 normaliser: Normaliser | None = None, batch: RolloutBatch | None = None) -> LossOutput:
        if entropy is None or entropy.shape != mask.shape:
            raise ValueError(f"D3STokenLoss needs entropy (B, T) = {tuple(mask.shape)} (the module passes the policy's "
                             f"token entropy), got {None if entropy is None else tuple(entropy.shape)}")
        B = mask.shape[0]
        if advantages.shape not in ((B,), (B, 1), mask.shape):
            raise ValueError(f"advantages must be (B,) or (B, T) = {tuple(mask.shape)}, got {tuple(advantages.shape)}")
        A = advantages.reshape(B, -1).expand(mask.shape)  # (B, T)
        keep = top_score_tokens(A.abs() * entropy.detach(), mask, self.k)  # (B, T) m'
        norm = normaliser if normaliser is not None else Normaliser.of(mask)
        kept_norm = Normaliser(num_tokens=torch.ceil(self.k * norm.num_tokens).clamp(min=1),
                               num_sequences=norm.num_sequences, max_len=norm.max_len)
        out = super().__call__(logprobs, old_logprobs, advantages, keep, ref_logprobs=ref_logprobs, entropy=entropy,
                               normaliser=kept_norm, batch=batch)
        out.metrics["kept_token_frac"] = keep.sum().detach() / norm.num_tokens
        return out
