"""KL estimators between the policy and a reference, per token (Schulman 2020, "Approximating KL
divergence", http://joschu.net/blog/kl-approx.html). With ``δ = log π_ref − log π`` on tokens sampled from π:

    k1 = −δ                      unbiased, high variance, can be negative
    k2 = δ² / 2                  biased, low variance
    k3 = exp(δ) − δ − 1          unbiased, low variance, >= 0   (GRPO's choice, arXiv 2402.03300 eq. 4)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from common.ops import MAX_LOG_RATIO

KLEstimator = Literal["k1", "k2", "k3"]

# The estimate itself is clamped to ±_MAX_KL (verl's bound) so one token cannot dominate the batch's KL term.
_MAX_KL = 10.0


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token KL(π ‖ π_ref) estimate. Shapes: (B, T), (B, T) -> (B, T); values in [−10, 10]."""
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} must match")
    if ref_logprobs.device != logprobs.device:
        raise ValueError(f"ref_logprobs is on {ref_logprobs.device} but logprobs is on {logprobs.device}")
    delta = (ref_logprobs - logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # (B, T): k3 <= e^10 − 11 ≈ 2.2e4
    if estimator == "k1":
        kl = -delta
    elif estimator == "k2":
        kl = 0.5 * delta**2
    elif estimator == "k3":
        kl = torch.expm1(delta) - delta  # expm1 keeps k3 >= 0 in float32 near δ = 0
    else:
        raise ValueError(f"kl estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")
    return kl.clamp(-_MAX_KL, _MAX_KL)
