"""HAPO's entropy-aware token loss (Heterogeneous Adaptive Policy Optimization, "From Uniform to
Heterogeneous", arXiv 2509.16591; code github.com/starriver030515/HAPO, ``verl/trainer/ppo/core_algos.py``:
``compute_entropy_h``, ``ada_clip``, ``ada_advantage``, ``compute_policy_loss``).

Notation (code -> paper): ``h`` -> the normalised entropy h̃ in [−1, 1], ``clip_alpha`` -> α, ``adv_beta`` -> β,
``entropy_pivot`` -> the pivot quantile.

    z    = log(max(H, 1e-8));  q = quantile_valid(z, pivot) ("nearest");  s = sqrt(max(1e-8, mean_valid (z − q)²))
    h    = (z − q)/s;   h̃ = h / max_valid{h > 0}  if h > 0,   h / |min_valid{h < 0}|  if h <= 0
    ε'_low  = ε_low (1 − α h̃) where h̃ <= 0, else ε_low          (asymmetric adaptive clipping)
    ε'_high = ε_high(1 + α h̃) where h̃ > 0,  else ε_high
    Ã    = A(1 + β h̃);  band = 1 − ε'_low/2 < ρ < 1 + ε'_high/2     (differential advantage redistribution)
    A'   = (band ? A : Ã) if h̃ > 0;   (band ? Ã : A) if h̃ <= 0
    loss = token_mean( dual_clip_c( max(−A' ρ, −A' clip(ρ, 1 − ε'_low, 1 + ε'_high)) ) ),  c = 10

h̃, ε' and A' carry no gradient. DIVERGENCE (paper vs code): the public code computes the negative branch as
``h·(1/min h)``, which is *positive*, so there h̃ >= 0 everywhere and the low-entropy branches never fire; the
paper's intent (lower temperature and stronger probability reduction at low-entropy tokens) needs the
sign-preserving h̃ above, which is the default here. ``code_compat=True`` reproduces the code.

The entropy statistics are over the micro-batch's valid tokens (as in the code, per micro-batch); the loss is
micro-batch invariant for fixed statistics, and exact when ``micro_batch_size`` is None. Under data parallelism
(``all_gather``, set by the Loop) they are over every rank's valid tokens of the global micro-batch (each rank's
k-th micro-batch together), computed on the gathered entropies as one process on the global micro-batch. Adaptive temperature
sampling (the rollout side of HAPO, ``common/methods/hapo.py``, the paper's home) needs the previous step's
statistics, :func:`hapo_entropy_stats`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from common.losses.aggregate import AGGREGATIONS, Aggregation, Normaliser, aggregate
from common.losses.base import LossOutput, PolicyLoss, check_token_shapes
from common.losses.ppo_clip import clipped_surrogate
from common.ops import MAX_LOG_RATIO, masked_mean, masked_sum

if TYPE_CHECKING:
    from common.batch import RolloutBatch

# Entropies are floored at _MIN_ENTROPY before log() (the code's 1e-8): a one-hot next-token distribution has
# H = 0 and log 0 = −inf.
_MIN_ENTROPY = 1e-8
# The RMS spread s is floored at sqrt(_MIN_VAR) (the code's 1e-8), so a batch of equal entropies gives h = 0.
_MIN_VAR = 1e-8


class EntropyStats(NamedTuple):
    """The four statistics that define h̃ (the rollout's adaptive temperature reuses the previous step's)."""

    pivot: Tensor  # () q, the pivot quantile of log H
    scale: Tensor  # () s, the RMS of log H around q
    pos_scale: Tensor  # () max of h over h > 0 (1 if none)
    neg_scale: Tensor  # () |min of h| over h < 0 (1 if none); in code_compat mode min h itself (<= 0)


def hapo_entropy_stats(entropy: Tensor, mask: Tensor, pivot: float = 0.8, code_compat: bool = False,
                       all_gather: Callable[[Tensor], tuple[Tensor, int]] | None = None) -> EntropyStats:
    """q, s and the two branch scales of HAPO's normalised entropy over the valid tokens (no grad, no host sync).

    q is ``torch.quantile(z[mask], pivot, interpolation="nearest")``, found by one sort. ``all_gather`` (every
    rank's rows in rank order, a collective; e.g. ``common.distributed.all_gather_rows``): the statistics are over
    every data-parallel rank's valid tokens, computed on the gathered entropies as one process on the global batch.
    Shapes: entropy, mask (B, T) -> four () tensors.
    """
    if entropy.shape != mask.shape or mask.dtype != torch.bool:
        raise ValueError(f"entropy {tuple(entropy.shape)} and a bool mask {tuple(mask.shape)} must both be (B, T)")
    if not 0 <= pivot <= 1:
        raise ValueError(f"pivot must be in [0, 1], got {pivot}")
    if all_gather is not None:
        every, _ = all_gather(torch.stack([entropy.detach().flatten(), mask.flatten().to(entropy.dtype)], 1))  # (L, 2)
        return hapo_entropy_stats(every[None, :, 0], every[None, :, 1] > 0, pivot, code_compat)  # over (1, L)
    with torch.no_grad():
        z = torch.log(entropy.detach().clamp(min=_MIN_ENTROPY))  # (B, T)
        ordered = torch.sort(z.masked_fill(~mask, torch.inf).flatten()).values  # (B·T,) valid first, ascending
        n = mask.sum()  # ()
        idx = torch.round(pivot * (n - 1).clamp(min=0).to(z.dtype)).long()  # () torch's "nearest" rule
        q = ordered[idx] if ordered.numel() else z.new_tensor(0.0)
        q = torch.where(n > 0, q, torch.zeros_like(q))
        s = masked_mean((z - q) ** 2, mask).clamp(min=_MIN_VAR).sqrt()  # ()
        h = (z - q) / s  # (B, T)
        pos = h.masked_fill(~(mask & (h > 0)), 0.0).amax() if h.numel() else z.new_tensor(0.0)
        low = h.masked_fill(~(mask & (h < 0)), 0.0).amin() if h.numel() else z.new_tensor(0.0)
        pos_scale = torch.where(pos > 0, pos, torch.ones_like(pos))
        neg_scale = low if code_compat else torch.where(low < 0, -low, torch.ones_like(low))
        neg_scale = torch.where(neg_scale == 0, torch.ones_like(neg_scale), neg_scale)
    return EntropyStats(q, s, pos_scale, neg_scale)


def normalised_entropy(entropy: Tensor, mask: Tensor, stats: EntropyStats) -> Tensor:
    """h̃ of every token under ``stats`` (see the module docstring); 0 off the mask. In [−1, 1] when ``stats``
    are this batch's own and sign-preserving. Shapes: entropy, mask (B, T) -> (B, T), no grad."""
    with torch.no_grad():
        h = (torch.log(entropy.detach().clamp(min=_MIN_ENTROPY)) - stats.pivot) / stats.scale  # (B, T)
        h_tilde = torch.where(h > 0, h / stats.pos_scale, h / stats.neg_scale)
        return h_tilde.masked_fill(~mask, 0.0)


def hapo_token_terms(h: Tensor, ratio: Tensor, advantages: Tensor, *, eps_low: float, eps_high: float,
                     clip_alpha: float, adv_beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric adaptive clip ranges and the redistributed advantage (code ``ada_clip``, ``ada_advantage``).

    Shapes: h (B, T), ratio (B, T) detached, advantages (B, T) -> (eps_low', eps_high', A') each (B, T).
    """
    high = h > 0  # (B, T)
    eps_lo = torch.where(high, torch.full_like(h, eps_low), eps_low * (1 - clip_alpha * h))
    eps_hi = torch.where(high, eps_high * (1 + clip_alpha * h), torch.full_like(h, eps_high))
    reshaped = advantages * (1 + adv_beta * h)  # (B, T) Ã
    band = (ratio > 1 - eps_lo / 2) & (ratio < 1 + eps_hi / 2)  # (B, T) the neutral band around ρ = 1
    A = torch.where(high, torch.where(band, advantages, reshaped), torch.where(band, reshaped, advantages))
    return eps_lo, eps_hi, A


class HAPOLoss(PolicyLoss):
    """HAPO's per-token loss: adaptive clip ranges and redistributed advantages from the normalised entropy
    (see the module docstring). Pair with :class:`~common.advantages.hapo.HAPOAdvantage`.

    Args:
        eps_low, eps_high: base clip ranges (code 0.2, 0.2).
        clip_alpha: α, how far the entropy widens a clip range (code 1; h̃ = ±1 doubles it).
        adv_beta: β, how far the entropy rescales the advantage, Ã = A(1 + βh̃) (code 1).
        entropy_pivot: quantile of log H that maps to h̃ = 0 (code 0.8).
        dual_clip: c of dual-clip PPO for negative advantages (code 10); None = off.
        aggregation: loss aggregation (code token_mean).
        code_compat: True reproduces the public code's h̃ (the negative branch made positive); False (default)
            is the paper's sign-preserving h̃.
    """

    def __init__(self, eps_low: float = 0.2, eps_high: float = 0.2, clip_alpha: float = 1.0, adv_beta: float = 1.0,
                 entropy_pivot: float = 0.8, dual_clip: float | None = 10.0, aggregation: Aggregation = "token_mean",
                 code_compat: bool = False):
        problems = []
        if not 0 <= eps_low < 1 or eps_high < 0:
            problems.append(f"eps_low must be in [0, 1) and eps_high >= 0, got {eps_low}, {eps_high}")
        if clip_alpha < 0 or adv_beta < 0:
            problems.append(f"clip_alpha and adv_beta must be >= 0, got {clip_alpha}, {adv_beta}")
        if not 0 <= entropy_pivot <= 1:
            problems.append(f"entropy_pivot must be in [0, 1], got {entropy_pivot}")
        if dual_clip is not None and dual_clip <= 1:
            problems.append(f"dual_clip must be > 1 (or None), got {dual_clip}")
        if aggregation not in AGGREGATIONS:
            problems.append(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if problems:
            raise ValueError("HAPOLoss: " + "; ".join(problems))
        self.eps_low, self.eps_high, self.clip_alpha, self.adv_beta = eps_low, eps_high, clip_alpha, adv_beta
        self.entropy_pivot, self.dual_clip, self.aggregation, self.code_compat = (
            entropy_pivot, dual_clip, aggregation, code_compat)

    # every rank's rows, set by the Loop under data parallelism: the entropy statistics are the global micro-batch's
    all_gather: Callable[[Tensor], tuple[Tensor, int]] | None = None

    def __call__(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                 ref_logprobs: Tensor | None = None, entropy: Tensor | None = None,
                 normaliser: Normaliser | None = None, batch: "RolloutBatch | None" = None) -> LossOutput:
        """Shapes: logprobs, old_logprobs, mask, entropy (B, T); advantages (B,) or (B, T)."""
        check_token_shapes(logprobs, old_logprobs, mask)
        if entropy is None or entropy.shape != mask.shape:
            raise ValueError(f"HAPOLoss needs entropy (B, T) = {tuple(mask.shape)}, got "
                             f"{None if entropy is None else tuple(entropy.shape)}")
        B, T = mask.shape
        if advantages.shape in ((B,), (B, 1)):
            advantages = advantages.reshape(B, 1).expand(B, T)
        if advantages.shape != (B, T):
            raise ValueError(f"advantages must be (B,) or (B, T) = ({B}, {T}), got {tuple(advantages.shape)}")
        norm = normaliser if normaliser is not None else Normaliser.of(mask)
        # 1. normalised entropy h̃ (no grad), from this micro-batch's statistics (every rank's under DDP)
        stats = hapo_entropy_stats(entropy, mask, self.entropy_pivot, self.code_compat, self.all_gather)
        h = normalised_entropy(entropy, mask, stats)
        with torch.no_grad():  # ρ for the neutral band of step 2 (the loss's own ρ is clipped_surrogate's)
            log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))  # (B, T)
            ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # (B, T)
        # 2. asymmetric clip ranges and redistributed advantages (no grad)
        eps_lo, eps_hi, A = hapo_token_terms(h, ratio, advantages.detach().to(ratio.dtype),
                                             eps_low=self.eps_low, eps_high=self.eps_high,
                                             clip_alpha=self.clip_alpha, adv_beta=self.adv_beta)
        # 3. dual-clip PPO with per-token bounds
        per_token, ratio, was_clipped = clipped_surrogate(logprobs, old_logprobs, A, mask, eps_low=eps_lo,
                                                          eps_high=eps_hi, dual_clip=self.dual_clip)  # (B, T) each
        loss = aggregate(per_token, mask, self.aggregation, norm)
        metrics = {
            "pg_loss": loss.detach(),
            "clip_frac": masked_sum(was_clipped.float(), mask).detach() / norm.num_tokens,
            "ratio": masked_sum(ratio, mask).detach() / norm.num_tokens,
            "high_entropy_frac": masked_sum((h > 0).float(), mask) / norm.num_tokens,
            "adv_reshaped_frac": masked_sum((A != advantages).float(), mask) / norm.num_tokens,
            "entropy": masked_sum(entropy, mask).detach() / norm.num_tokens,
        }
        return LossOutput(loss=loss, metrics=metrics)
