"""Entropy-aware token selection for the clipped surrogate: which tokens get policy gradient.

1. Top-entropy-quantile filter ("Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective RL for LLM
   Reasoning", Wang et al. 2025, arXiv 2506.01939, §4 eq. 6): only the ρ = 20% highest-entropy "forking" tokens
   of the batch get gradient; the denominator of the token-mean keeps every token.

       J = (1/Σ_i L_i) Σ_{i,t} 1[H_it >= τ_ρ] · min(ρ_it A_it, clip(ρ_it, 1 − ε_low, 1 + ε_high) A_it)

2. Clip-Cov and KL-Cov ("The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models",
   Cui et al. 2025, arXiv 2505.22617, §4.2 eqs. 11-12; code PRIME-RL/Entropy-Mechanism-of-RL,
   verl ``compute_policy_loss_clip_cov`` / ``compute_policy_loss_kl_cov``). Entropy falls when tokens with a
   high covariance between log-prob and advantage are pushed; so

       Cov_it = (ℓ_it − mean_valid ℓ)·(A_it − mean_valid A)                       (detached, per token)
       Clip-Cov: draw ⌊r·N⌋ (at least 1) tokens uniformly from {lb < Cov < ub, not PPO-clipped}; their loss
                 and gradient are set to 0                                         (eq. 11)
       KL-Cov:   the top ⌊k·N⌋ (at least 1) tokens by Cov get −A ρ + β|ℓ − ℓ^old|; all others −A ρ  (eq. 12)

   N is the number of valid tokens of the micro-batch (of every rank's, under DDP).

Implementation: dropping a token's policy gradient is done by zeroing its advantage (a (B, T) advantage), which
makes its clipped loss and its gradient exactly 0 while it still counts in every denominator.

Deviations / caveats: the entropy threshold and the covariance means are taken over the **micro-batch** (the
authors' verl code computes them per micro-batch, so a split changes the selection); with ``micro_batch_size``
None they are over the whole optimiser minibatch. The entropy threshold is the ⌈ρN⌉-th largest entropy (ties at
the threshold are all kept), not ``torch.quantile``'s interpolated value; KL-Cov's top tokens break ties by
position (row-major). Clip-Cov's uniform draw gives each valid token a key that is a hash of (``seed``, the
optimiser step of ``set_step``, the call within the step, the token's index among the micro-batch's valid tokens,
row-major) and detaches the eligible tokens with the smallest keys: a run and a resumed run draw the same tokens
without checkpointing RNG state, and the draw does not depend on padding, device or rank.

Data parallelism (DDP): with ``all_gather`` (set by the Loop; e.g. ``common.distributed.all_gather_rows``) the
statistics and selections are over the **global** micro-batch, every rank's k-th micro-batch together (with
``micro_batch_size`` None: the global optimiser minibatch, the paper's batch). Each rank gathers its tokens'
entropies (80/20) or log-probs, old log-probs, advantages and mask (Clip-Cov, KL-Cov), computes the threshold,
covariance means, N and the selection on the concatenation (ranks in order: the global batch's rows) exactly as
one process does on the global micro-batch, and keeps its own tokens; so the chosen tokens are those one process
chooses (the sums inside the means may differ in order, ~1e-16 relative).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from common.losses.aggregate import AGGREGATIONS, Aggregation, Normaliser, aggregate
from common.losses.base import LossOutput, PolicyLoss, check_token_shapes
from common.losses.kl import KLEstimator
from common.losses.ppo_clip import ClippedPolicyLoss, clipped_surrogate
from common.ops import MAX_LOG_RATIO, masked_mean, masked_sum

if TYPE_CHECKING:
    from common.batch import RolloutBatch


def _token_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """(B,) or (B, 1) or (B, T) -> (B, T) broadcast over T."""
    B = mask.shape[0]
    if advantages.shape in ((B,), (B, 1)):
        return advantages.reshape(B, 1).expand(mask.shape)
    if advantages.shape != mask.shape:
        raise ValueError(f"advantages must be (B,) or (B, T) = {tuple(mask.shape)}, got {tuple(advantages.shape)}")
    return advantages


Gather = Callable[[Tensor], tuple[Tensor, int]]  # every rank's rows in rank order and this rank's start


def _every(columns: Tensor, all_gather: Gather | None) -> tuple[Tensor, int]:
    """This rank's flattened tokens ``columns`` (L, k) -> every rank's (Σ_r L_r, k) and this rank's start."""
    return (columns, 0) if all_gather is None else tuple(all_gather(columns))


def top_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float, all_gather: Gather | None = None) -> Tensor:
    """Tokens whose entropy is among the top ``quantile`` fraction of the valid tokens (at least one).

    Naive reference: ``H >= sorted(H[mask], descending)[ceil(quantile·N) − 1]``. Computed by one sort with
    invalid tokens at −inf, no host sync. With ``all_gather`` the threshold and N are those of every rank's valid
    tokens (gathered): exactly the threshold of one process on the global batch. Shapes: entropy, mask (B, T) ->
    (B, T) bool.
    """
    if entropy.shape != mask.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)} and mask {tuple(mask.shape)} must both be (B, T)")
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    h = entropy.detach().masked_fill(~mask, -torch.inf).flatten()  # (B·T,)
    every, _ = _every(torch.stack([h, mask.flatten().to(h.dtype)], 1), all_gather)  # (L, 2) every rank's tokens
    h = every[:, 0]  # (L,)
    desc = torch.sort(h, descending=True).values  # (L,)
    n = (every[:, 1] > 0).sum()  # () valid tokens
    k = torch.ceil(quantile * n.to(h.dtype)).long().clamp(min=1, max=max(h.numel(), 1))  # ()
    threshold = desc[k - 1] if h.numel() else h.new_tensor(0.0)  # () the k-th largest entropy
    return mask & (entropy.detach() >= threshold)


def token_covariance(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """``Cov_it = (ℓ_it − mean ℓ)(A_it − mean A)``, means over the valid tokens (arXiv 2505.22617 eq. 10, per
    token, detached). Shapes: logprobs, mask (B, T); advantages (B,) or (B, T) -> (B, T); −inf off the mask."""
    A = _token_advantages(advantages, mask).detach().to(logprobs.dtype)  # (B, T)
    lp = logprobs.detach()
    cov = (lp - masked_mean(lp, mask)) * (A - masked_mean(A, mask))  # (B, T)
    return cov.masked_fill(~mask, -torch.inf)


def _rank_select(keys: Tensor, eligible: Tensor, count: Tensor) -> Tensor:
    """The ``count`` eligible positions with the smallest keys (fewer if fewer are eligible; ties by position),
    without a host sync. Shapes: keys, eligible (B, T); count () -> (B, T) bool."""
    flat = keys.masked_fill(~eligible, torch.inf).flatten()  # (B·T,)
    order = torch.argsort(flat, stable=True)  # (B·T,)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))  # (B·T,)
    return eligible & (rank.view(keys.shape) < count)


def _tokens(all_gather: Gather | None, mask: Tensor, *columns: Tensor) -> tuple[tuple[Tensor, ...], Tensor, int]:
    """Every rank's tokens as one row: ``columns`` (B, T) each and ``mask`` flattened, gathered and returned as
    (1, L) tensors (the mask bool), with this rank's start in L. One process: this micro-batch's tokens."""
    dtype = columns[0].dtype
    for c in columns[1:]:
        dtype = torch.promote_types(dtype, c.dtype)
    stacked = torch.stack([*(c.detach().to(dtype).flatten() for c in columns), mask.flatten().to(dtype)], 1)  # (B·T, k+1)
    every, start = _every(stacked, all_gather)  # (L, k + 1)
    return tuple(every[None, :, i] for i in range(len(columns))), every[None, :, -1] > 0, start  # ok: k column views, not a loop over the batch


def _mine(selected: Tensor, start: int, mask: Tensor) -> Tensor:
    """This rank's tokens of a (1, L) selection over every rank's -> (B, T) like ``mask``."""
    return selected[0, start:start + mask.numel()].view(mask.shape)


_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2³² for int64 tensors x in [0, 2³²) without int64 overflow (16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixing function (Wellons' "lowbias32"), on int64 tensors in [0, 2³²)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_keys(index: Tensor, seed: int) -> Tensor:
    """Pseudo-random keys in [0, 1) (float64, 53 bits) that are a function of ``index`` (int64 in [0, 2³²)) and
    ``seed`` only: the same token index gets the same key on any device, rank or layout. Shapes: any -> same."""
    s = int(seed) & _M32
    x = (index.long() & _M32) ^ s
    hi = _hash32(_hash32(x) ^ 0x9E3779B9)  # 32 bits
    lo = _hash32(_hash32(x ^ 0x85EBCA6B) ^ s)  # 32 bits, 21 used
    return (hi * 2**21 + (lo >> 11)).to(torch.float64) / 2**53


def _draw_seed(seed: int, step: int, call: int) -> int:
    """One 32-bit seed per (seed, optimiser step, call within the step)."""
    x = torch.tensor([(seed * 0x9E3779B1 + step * 0x85EBCA77 + call * 0xC2B2AE3D) & _M32])
    return int(_hash32(_hash32(x) ^ 0x27D4EB2F))


def clip_cov_select(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, ratio: float,
                    lb: float, ub: float, eps_low: float, eps_high: float, seed: int,
                    all_gather: Gather | None = None) -> Tensor:
    """Clip-Cov's tokens to detach (arXiv 2505.22617 eq. 11): ``max(1, ⌊ratio·N⌋)`` drawn uniformly from the valid,
    not-PPO-clipped tokens with ``lb < Cov < ub``: those with the smallest :func:`uniform_keys` of (their index
    among the valid tokens, ``seed``). With ``all_gather`` N, the covariance means and the draw are over every
    rank's valid tokens (one process's selection on the global micro-batch). Shapes: (B, T) -> (B, T) bool."""
    with torch.no_grad():
        A = _token_advantages(advantages, mask)  # (B, T)
        (lp, old, A), m, start = _tokens(all_gather, mask, logprobs, old_logprobs, A)  # (1, L) each
        _, _, clipped = clipped_surrogate(lp, old, A, m, eps_low=eps_low, eps_high=eps_high)
        cov = token_covariance(lp, A, m)  # (1, L)
        eligible = m & ~clipped & (cov > lb) & (cov < ub)
        n = torch.floor(ratio * m.sum().to(torch.float64)).long().clamp(min=1)  # ()
        keys = uniform_keys(m.long().cumsum(1) - 1, seed)  # (1, L) by index among the valid tokens
        return _mine(_rank_select(keys, eligible, n), start, mask)


def kl_cov_select(logprobs: Tensor, advantages: Tensor, mask: Tensor, *, ratio: float,
                  all_gather: Gather | None = None) -> Tensor:
    """KL-Cov's penalised tokens (arXiv 2505.22617 eq. 12): the ``max(1, ⌊ratio·N⌋)`` valid tokens with the
    largest Cov (ties: the first in row-major order). With ``all_gather`` N, the covariance means and the top
    tokens are over every rank's valid tokens (one process's selection on the global micro-batch). Shapes:
    (B, T) -> (B, T) bool."""
    with torch.no_grad():
        (lp, A), m, start = _tokens(all_gather, mask, logprobs, _token_advantages(advantages, mask))  # (1, L) each
        cov = token_covariance(lp, A, m)  # (1, L)
        n = torch.floor(ratio * m.sum().to(torch.float64)).long().clamp(min=1)  # ()
        return _mine(_rank_select(-cov, m, n), start, mask)


class EntropyTopQuantileLoss(ClippedPolicyLoss):
    """Clipped surrogate on the top-``quantile`` entropy tokens only (Wang et al. 2025, arXiv 2506.01939).

    ``ClippedPolicyLoss`` with the advantage set to 0 on the other tokens (they keep counting in the
    denominators). Defaults follow the paper's DAPO base: clip-higher (0.2, 0.28), token-mean, no KL.

    Args:
        quantile: ρ, the fraction of valid tokens (highest entropy) that get gradient (paper 0.2).
        eps_low, eps_high, dual_clip, ratio_level, aggregation, beta, kl_estimator, entropy_coef: as in
            :class:`~common.losses.ppo_clip.ClippedPolicyLoss`.
    """

    def __init__(self, quantile: float = 0.2, eps_low: float = 0.2, eps_high: float = 0.28,
                 dual_clip: float | None = None, aggregation: Aggregation = "token_mean", beta: float = 0.0,
                 kl_estimator: KLEstimator = "k3", entropy_coef: float = 0.0):
        if not 0 < quantile <= 1:
            raise ValueError(f"EntropyTopQuantileLoss: quantile must be in (0, 1], got {quantile}")
        super().__init__(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, aggregation=aggregation,
                         beta=beta, kl_estimator=kl_estimator, entropy_coef=entropy_coef)
        self.quantile = quantile

    # every rank's rows, set by the Loop under data parallelism: the quantile is the global micro-batch's
    all_gather: Gather | None = None

    def __call__(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                 ref_logprobs: Tensor | None = None, entropy: Tensor | None = None,
                 normaliser: Normaliser | None = None, batch: "RolloutBatch | None" = None) -> LossOutput:
        if entropy is None:
            raise ValueError("EntropyTopQuantileLoss needs entropy (B, T): the module passes the policy's token entropy")
        keep = top_entropy_mask(entropy, mask, self.quantile, self.all_gather)  # (B, T)
        A = _token_advantages(advantages, mask) * keep  # (B, T) zero off the forking tokens
        out = super().__call__(logprobs, old_logprobs, A, mask, ref_logprobs=ref_logprobs, entropy=entropy,
                               normaliser=normaliser, batch=batch)
        norm = normaliser if normaliser is not None else Normaliser.of(mask)
        out.metrics["kept_frac"] = keep.sum().detach() / norm.num_tokens
        return out


class ClipCovLoss(ClippedPolicyLoss):
    """Clip-Cov (Cui et al. 2025, arXiv 2505.22617 eq. 11): the clipped surrogate with a random
    ``ratio`` share of the high-covariance tokens detached (see :func:`clip_cov_select`).

    Args:
        ratio: r, share of valid tokens detached (paper 2e-4; at least one token per micro-batch).
        lb, ub: the covariance band (lb, ub) the detached tokens are drawn from (paper 1 and 5).
        seed: seed of the token draw; each call draws with keys hashed from (seed, the step of ``set_step``, the
            call within the step), so a resumed run draws what the straight run drew.
        eps_low, eps_high, dual_clip, aggregation, beta, kl_estimator, entropy_coef: as in ClippedPolicyLoss.
    """

    def __init__(self, ratio: float = 2e-4, lb: float = 1.0, ub: float = 5.0, seed: int = 0, eps_low: float = 0.2,
                 eps_high: float = 0.2, dual_clip: float | None = None, aggregation: Aggregation = "token_mean",
                 beta: float = 0.0, kl_estimator: KLEstimator = "k3", entropy_coef: float = 0.0):
        problems = []
        if not 0 < ratio <= 1:
            problems.append(f"ratio must be in (0, 1], got {ratio}")
        if not lb < ub:
            problems.append(f"lb must be < ub, got lb={lb}, ub={ub}")
        if problems:
            raise ValueError("ClipCovLoss: " + "; ".join(problems))
        super().__init__(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, aggregation=aggregation,
                         beta=beta, kl_estimator=kl_estimator, entropy_coef=entropy_coef)
        self.ratio, self.lb, self.ub, self.seed = ratio, lb, ub, seed
        self._step, self._calls = 0, 0

    # every rank's rows, set by the Loop under data parallelism: N, the means and the draw are the global micro-batch's
    all_gather: Gather | None = None

    def set_step(self, global_step: int) -> None:
        self._step, self._calls = int(global_step), 0

    def draw_seed(self) -> int:
        """The key seed of the next call: (seed, step, call within the step) hashed; the call counter advances."""
        self._calls += 1
        return _draw_seed(self.seed, self._step, self._calls - 1)

    def __call__(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                 ref_logprobs: Tensor | None = None, entropy: Tensor | None = None,
                 normaliser: Normaliser | None = None, batch: "RolloutBatch | None" = None) -> LossOutput:
        drop = clip_cov_select(logprobs, old_logprobs, advantages, mask, ratio=self.ratio, lb=self.lb, ub=self.ub,
                               eps_low=self.eps_low, eps_high=self.eps_high, seed=self.draw_seed(),
                               all_gather=self.all_gather)
        A = _token_advantages(advantages, mask).masked_fill(drop, 0.0)  # (B, T) corr = 0 on the drawn tokens
        out = super().__call__(logprobs, old_logprobs, A, mask, ref_logprobs=ref_logprobs, entropy=entropy,
                               normaliser=normaliser, batch=batch)
        norm = normaliser if normaliser is not None else Normaliser.of(mask)
        out.metrics["cov_clip_frac"] = drop.sum().detach() / norm.num_tokens
        return out


class KLCovLoss(PolicyLoss):
    """KL-Cov (Cui et al. 2025, arXiv 2505.22617 eq. 12): unclipped ``−A ρ`` on every token plus
    ``coef·|ℓ − ℓ^old|`` on the top-``ratio`` tokens by covariance (see :func:`kl_cov_select`).

    Args:
        ratio: k, share of valid tokens penalised (paper 2e-3 for 7B; 2e-4 for 32B).
        coef: β, the coefficient of |ℓ − ℓ^old| (paper 1).
        aggregation: token aggregation of the per-token loss (paper: token_mean).
    """

    def __init__(self, ratio: float = 2e-3, coef: float = 1.0, aggregation: Aggregation = "token_mean"):
        problems = []
        if not 0 < ratio <= 1:
            problems.append(f"ratio must be in (0, 1], got {ratio}")
        if coef < 0:
            problems.append(f"coef must be >= 0, got {coef}")
        if aggregation not in AGGREGATIONS:
            problems.append(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if problems:
            raise ValueError("KLCovLoss: " + "; ".join(problems))
        self.ratio, self.coef, self.aggregation = ratio, coef, aggregation

    # every rank's rows, set by the Loop under data parallelism: N, the means and the top tokens are global
    all_gather: Gather | None = None

    def __call__(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                 ref_logprobs: Tensor | None = None, entropy: Tensor | None = None,
                 normaliser: Normaliser | None = None, batch: "RolloutBatch | None" = None) -> LossOutput:
        check_token_shapes(logprobs, old_logprobs, mask)
        norm = normaliser if normaliser is not None else Normaliser.of(mask)
        A = _token_advantages(advantages, mask).to(logprobs.dtype)  # (B, T)
        log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))  # (B, T)
        ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # (B, T) (the verl code clamps at ±20)
        picked = kl_cov_select(logprobs, A, mask, ratio=self.ratio, all_gather=self.all_gather)  # (B, T)
        per_token = -A * ratio + self.coef * picked * log_ratio.abs()  # (B, T)
        loss = aggregate(per_token, mask, self.aggregation, norm)
        metrics = {
            "pg_loss": loss.detach(),
            "ratio": masked_sum(ratio, mask).detach() / norm.num_tokens,
            "kl_cov_frac": picked.sum().detach() / norm.num_tokens,
        }
        if entropy is not None:
            metrics["entropy"] = masked_sum(entropy, mask).detach() / norm.num_tokens
        return LossOutput(loss=loss, metrics=metrics)
