"""Adaptive temperature sampling (HAPO, "From Uniform to Heterogeneous", arXiv 2509.16591, §3.1).

Each sampled token gets its own temperature from how uncertain the policy is there, measured against the
previous training step's token entropies:

    z = log max(H, 1e-8)                       H = entropy of the next-token distribution at T_0
    h = (z − q) / s                             q = ρ_piv-quantile of last step's z, s = RMS of (z − q) there
    h̃ = h / max(h⁺)  if h > 0,   h / |min(h⁻)|  if h ≤ 0        (scales from last step; h̃ ∈ [−1, 1])
    T = T_0 · (1 + τ_T · clip(h̃, −1, 1))

so high-entropy ("forking") tokens are sampled hotter and low-entropy ones colder. The public code's negative
branch divides by min(h) (a negative number), which makes h̃ ≥ 0 everywhere; this follows the paper's intent
(sign-preserving) unless ``code_compat=True``. Before the first update (no statistics yet) T = T_0.
The training log-probs stay at T_0 (the paper's choice), so sampler and learner differ slightly here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from common.losses.hapo import EntropyStats, hapo_entropy_stats, normalised_entropy

# Entropies are floored before the log so a one-hot distribution (H = 0) gives a finite z.
_MIN_ENTROPY = 1e-8


class AdaptiveTemperature(nn.Module):
    """A transformers logits processor with checkpointed statistics (buffers). The statistics and h̃ are
    HAPO's normalised entropy from ``common.losses.hapo`` (one definition for the sampler and the loss).

    Args:
        tau: τ_T, the relative temperature swing (HAPO 0.05).
        pivot: ρ_piv, the entropy quantile that maps to h = 0 (HAPO 0.8).
        code_compat: reproduce the public code's sign bug (h̃ ≥ 0 everywhere).
    """

    def __init__(self, tau: float = 0.05, pivot: float = 0.8, code_compat: bool = False):
        super().__init__()
        if not 0 <= tau < 1:
            raise ValueError(f"tau must be in [0, 1) so temperatures stay positive, got {tau}")
        if not 0 < pivot < 1:
            raise ValueError(f"pivot must be a quantile in (0, 1), got {pivot}")
        self.tau, self.quantile, self.code_compat = tau, pivot, code_compat
        for name in EntropyStats._fields:  # q (pivot), s (scale), pos_scale, neg_scale
            self.register_buffer(name, torch.ones(()))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    @property
    def stats(self) -> EntropyStats:
        return EntropyStats(*(getattr(self, name) for name in EntropyStats._fields))

    def normalised(self, z: Tensor) -> Tensor:
        """h̃ for log-entropies ``z`` under the stored statistics; any shape -> same shape, in [−1, 1]."""
        h = normalised_entropy(z.exp().reshape(1, -1), torch.ones(1, z.numel(), dtype=torch.bool), self.stats)
        return h.reshape(z.shape).clamp(-1.0, 1.0)

    @torch.no_grad()
    def observe(self, entropy: Tensor, mask: Tensor) -> None:
        """Update the statistics from a step's token entropies. Shapes: (B, T), (B, T) bool."""
        if not bool(mask.any()):
            return
        for name, value in zip(EntropyStats._fields, hapo_entropy_stats(entropy.float(), mask, self.quantile, self.code_compat)):
            getattr(self, name).copy_(value)
        self.ready.fill_(True)

    def temperature_factor(self, scores: Tensor) -> Tensor:
        """(1 + τ h̃) for next-token scores already at T_0. Shapes: (B, V) -> (B,)."""
        logp = torch.log_softmax(scores.float(), dim=-1)
        entropy = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)  # (B,) top-k/top-p -inf entries count 0
        h_tilde = self.normalised(torch.log(entropy.clamp(min=_MIN_ENTROPY)))
        return torch.where(self.ready, 1.0 + self.tau * h_tilde, torch.ones_like(h_tilde))

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:  # transformers LogitsProcessor protocol
        return scores / self.temperature_factor(scores)[:, None].to(scores.dtype)
