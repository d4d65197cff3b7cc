"""Small utilities from the offline / classic "seed" papers of agentic.md §15 (not trainers):

- IQL (Kostrikov et al., arXiv 2110.06169): the expectile value loss, eq. 5, ℓ_τ(u) = |τ − 1(u < 0)|·u² with
  u = Q̂(s, a) − V(s); and advantage-weighted regression weights for policy extraction, eq. 7,
  w = min(exp(β·(Q̂ − V)), w_max) (advantage-weighted SFT, or filtering replay buffers such as SPEAR's / ARPO's).
- PCPG (Luo et al., FG 2020, arXiv 2003.03983): a 1-D "pseudo-convolution" of per-step rewards or losses over
  neighbouring steps, r̂_t = Σ_{j=−h}^{h} w_j·r_{t+j} (zero-padded), here as a masked convolution along tokens or turns.
  No LLM-RL evidence: off by default everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from common.ops import masked_mean

__all__ = ["expectile_loss", "awr_weights", "smooth_over_time"]


def expectile_loss(u: Tensor, tau: float = 0.7, mask: Tensor | None = None) -> Tensor:
    """IQL's expectile regression loss (eq. 5): mean of |τ − 1(u < 0)|·u² over ``mask`` (all if None), u = target −
    prediction (Q̂ − V). τ = 0.5 is half the MSE; τ → 1 approaches the max over the data's actions (IQL: 0.7 on MuJoCo,
    0.9 on AntMaze). Shapes: u (...), mask (...) bool -> (); an empty mask gives 0."""
    if not 0.0 < tau < 1.0:
        raise ValueError(f"tau must be in (0, 1), got {tau}")
    weight = torch.where(u < 0, torch.full_like(u, 1.0 - tau), torch.full_like(u, tau))
    loss = weight * u * u
    return loss.mean() if mask is None else masked_mean(loss, mask)


def awr_weights(advantages: Tensor, beta: float = 3.0, max_weight: float = 100.0) -> Tensor:
    """IQL / AWR policy-extraction weights (eq. 7): min(exp(β·A), max_weight), computed as exp(min(β·A, log max_weight))
    so a large advantage never overflows; detached (weights, not a path for gradients). IQL: β = 3 (MuJoCo) / 10
    (AntMaze), max 100. Shapes: (...) -> (...)."""
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if not max_weight > 0:
        raise ValueError(f"max_weight must be > 0, got {max_weight}")
    if not torch.isfinite(advantages).all():
        raise ValueError("advantages must be finite")
    return torch.exp((beta * advantages.detach()).clamp(max=math.log(max_weight)))


def smooth_over_time(x: Tensor, mask: Tensor, kernel: Sequence[float] | Tensor, renormalise: bool = False) -> Tensor:
    """PCPG's pseudo-convolution along the last axis: y_t = Σ_{j=−h}^{h} w_j·x_{t+j}·m_{t+j}, zero outside the mask
    and past the ends (zero padding), y = 0 where m = 0. ``kernel`` (2h + 1,) is centred (odd length); ``renormalise``
    divides by the kernel mass that fell on valid positions (so the edges are not damped; ours). Shapes: x (B, T),
    mask (B, T) bool -> (B, T)."""
    k = torch.as_tensor(kernel, dtype=x.dtype, device=x.device)
    if k.dim() != 1 or k.numel() % 2 == 0:
        raise ValueError(f"kernel must be 1-D with an odd length (2h + 1), got shape {tuple(k.shape)}")
    if x.dim() != 2 or mask.shape != x.shape:
        raise ValueError(f"x and mask must be (B, T) of one shape, got {tuple(x.shape)} and {tuple(mask.shape)}")
    h = k.numel() // 2
    m = mask.to(x.dtype)
    xm = torch.where(mask.bool(), x, torch.zeros_like(x))  # masked values never enter, even NaN
    w = k.view(1, 1, -1)  # conv1d is a cross-correlation: kernel entry j + h multiplies x_{t+j}
    y = F.conv1d(xm[:, None], w, padding=h)[:, 0]  # (B, T): y_t = Σ_j k[j + h]·x_{t+j}
    if renormalise:
        mass = F.conv1d(m[:, None], w, padding=h)[:, 0]
        y = torch.where(mass != 0, y / torch.where(mass != 0, mass, torch.ones_like(mass)), torch.zeros_like(y))
    return torch.where(mask.bool(), y, torch.zeros_like(y))
