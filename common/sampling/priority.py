"""SPO's prioritised prompt sampling from the value tracker (arXiv 2509.13232; shared/methods/text.md §11).

    w(x) = sqrt(v̂(x) (1 − v̂(x))) / N_eff(x)^γ + ε_explore,      P(x) = w(x) / Σ_x' w(x')

Prompts the tracker is unsure about (v̂ near 0.5: the most learning signal) or has seen little of (small N_eff) are
drawn more often; ε_explore keeps every prompt reachable. γ ∈ [0, 1] [UNVERIFIED value]; ε_explore = 0.05.
Whether ε is added before or after normalising is not stated; here it is added to the unnormalised weight.
"""

from __future__ import annotations

import torch
from torch import Tensor


def spo_priority(alpha: Tensor, beta: Tensor, *, gamma: float, eps_explore: float) -> Tensor:
    """Sampling probabilities over prompts. Shapes: alpha (N,), beta (N,) -> (N,), summing to 1."""
    if alpha.shape != beta.shape or alpha.dim() != 1 or alpha.numel() == 0:
        raise ValueError(f"alpha and beta must be equal non-empty 1-D tensors (N,), got {tuple(alpha.shape)} and {tuple(beta.shape)}")
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if eps_explore < 0:
        raise ValueError(f"eps_explore must be >= 0, got {eps_explore}")
    n_eff = alpha + beta  # (N,)
    v = alpha / n_eff  # (N,)
    w = torch.sqrt(v * (1 - v)) / n_eff.pow(gamma) + eps_explore  # (N,)
    total = w.sum()
    return w / total if bool(total > 0) else torch.full_like(w, 1.0 / w.numel())
