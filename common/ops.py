"""Group and mask primitives shared by every estimator and loss.

Groups are given by ``group_ids: LongTensor[B]`` with values in ``[0, num_groups)``. Groups need not be
contiguous (members may be interleaved) nor of equal size. Every reduction is a scatter (``index_add_``,
``scatter_reduce_``) over ``group_ids``: no Python loop over samples or groups, no host sync.

Every group reduction validates its inputs (one host sync for the id range) unless called with
``validate=False`` by code that has already called :func:`check_groups` once for the same ids.

Group reductions return one value per group, shape ``(num_groups,)``; index with ``[group_ids]`` to
broadcast back to samples. ``num_groups`` defaults to ``B``, an upper bound when every group is non-empty,
so no ``max()`` has to be read back from the device; slots of empty groups hold 0 (sums, counts, means,
stds) or the reduction's identity replaced by 0 (max, min, median).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "check_groups",
    "group_sum",
    "group_count",
    "group_first",
    "group_mean",
    "group_std",
    "group_max",
    "group_min",
    "group_median",
    "masked_sum",
    "masked_mean",
    "MAX_LOG_RATIO",
]

# The one bound on a log-ratio (log π/π_old, log π_ref/π) before exp(): e^10 ≈ 2.2e4 is finite even in fp16, so a
# large mismatch between sampler, trainer and reference cannot overflow a ratio, a KL estimate or a loss to inf/NaN.
# Beyond the bound the token's gradient is 0, which a PPO clip would do to it anyway. Ports that follow an authors'
# code with another bound (±20 in SDPO's IS weight and HölderPO's power mean) pass theirs per call.
MAX_LOG_RATIO = 10.0


def check_groups(values: Tensor, group_ids: Tensor, num_groups: int | None = None, name: str = "rewards") -> int:
    """Validate ``values (B, ...)`` against ``group_ids (B,)``; return ``num_groups`` (default ``B``).

    Raises ``ValueError`` naming the argument for: a non-integer or non-1-D ``group_ids``, a length
    mismatch, ids outside ``[0, num_groups)``, or values on another device.
    """
    if not torch.is_tensor(group_ids) or group_ids.dim() != 1 or group_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"group_ids must be a 1-D integer tensor (B,), got "
            f"{getattr(group_ids, 'dtype', type(group_ids))} with shape {tuple(getattr(group_ids, 'shape', ()))}"
        )
    if not torch.is_tensor(values) or values.dim() == 0 or values.shape[0] != group_ids.shape[0]:
        raise ValueError(
            f"{name} must have the same leading size B as group_ids {tuple(group_ids.shape)}, "
            f"got shape {tuple(getattr(values, 'shape', ()))}"
        )
    if values.device != group_ids.device:
        raise ValueError(f"{name} is on {values.device} but group_ids is on {group_ids.device}; move both to one device")
    n = group_ids.shape[0] if num_groups is None else int(num_groups)
    if group_ids.numel() and bool(((group_ids < 0) | (group_ids >= max(n, 1))).any()):  # one check, one sync
        raise ValueError(
            f"group_ids must lie in [0, {n}) (num_groups={'B' if num_groups is None else n}), got values in "
            f"[{int(group_ids.min())}, {int(group_ids.max())}]; renumber groups with torch.unique(..., return_inverse=True)"
        )
    return n


def _check_vector(x: Tensor, group_ids: Tensor, num_groups: int | None, validate: bool = True) -> int:
    """:func:`check_groups` for the statistics defined on ``x (B,)`` only (group_sum takes ``(B, ...)``)."""
    if not validate:
        return group_ids.shape[0] if num_groups is None else int(num_groups)
    n = check_groups(x, group_ids, num_groups, "x")
    if x.dim() != 1:
        raise ValueError(f"x must be 1-D (B,), got shape {tuple(x.shape)}; group_sum reduces (B, ...) values")
    return n


def group_sum(x: Tensor, group_ids: Tensor, num_groups: int | None = None, *, validate: bool = True) -> Tensor:
    """``out[k] = Σ_{i: g_i = k} x_i``. Shapes: x (B, ...), group_ids (B,) -> (num_groups, ...)."""
    n = check_groups(x, group_ids, num_groups, "x") if validate else (group_ids.shape[0] if num_groups is None else int(num_groups))
    out = x.new_zeros((n, *x.shape[1:]))
    return out.index_add_(0, group_ids, x)


def group_count(group_ids: Tensor, num_groups: int | None = None, dtype: torch.dtype = torch.float32, *,
                validate: bool = True) -> Tensor:
    """``n_k = #{i : g_i = k}``. Shapes: group_ids (B,) -> (num_groups,)."""
    if validate:
        check_groups(group_ids, group_ids, num_groups, "group_ids")
    ones = torch.ones(group_ids.shape, dtype=dtype, device=group_ids.device)
    return group_sum(ones, group_ids, num_groups, validate=False)


def group_first(x: Tensor, group_ids: Tensor, num_groups: int | None = None, *, validate: bool = True) -> Tensor:
    """The value of each group's first member (lowest row); 0 for empty groups. Shapes: (B,) -> (num_groups,).

    Subtracting it before a reduction makes the values of an all-equal group exactly 0, so their mean,
    deviations and std are exactly 0 too (no rounding residue such as 7 x 0.1 / 7 != 0.1 in float32)."""
    n = _check_vector(x, group_ids, num_groups, validate)
    B = group_ids.shape[0]
    rows = torch.arange(B, device=group_ids.device)
    first = torch.full((n,), B, dtype=torch.long, device=group_ids.device).scatter_reduce_(0, group_ids, rows, reduce="amin")
    present = first < B
    return torch.where(present, x[first.clamp(max=max(B - 1, 0))] if B else x.new_zeros(n), x.new_zeros(n))


def group_mean(x: Tensor, group_ids: Tensor, num_groups: int | None = None, *, validate: bool = True) -> Tensor:
    """``μ_k = (1/n_k) Σ_{g_i=k} x_i``; 0 for empty groups. Shapes: (B,) -> (num_groups,)."""
    _check_vector(x, group_ids, num_groups, validate)
    n = group_count(group_ids, num_groups, x.dtype, validate=False)  # (N,)
    return group_sum(x, group_ids, num_groups, validate=False) / n.clamp(min=1)


def group_std(x: Tensor, group_ids: Tensor, num_groups: int | None = None, ddof: int = 1, *,
              validate: bool = True) -> Tensor:
    """Per-group standard deviation ``sqrt(Σ (x_i − μ_k)² / (n_k − ddof))``; ``ddof=1`` is the unbiased
    estimate (``torch.std``'s default, used by verl and TRL). Groups with ``n_k <= ddof`` get 0.

    Values are shifted by a member of their group (:func:`group_first`) and then centred (two passes), so an
    all-equal group gives exactly 0, not rounding noise. Shapes: x (B,), group_ids (B,) -> (num_groups,).
    """
    _check_vector(x, group_ids, num_groups, validate)
    x = x - group_first(x, group_ids, num_groups, validate=False)[group_ids]  # (B,) exact zeros for equal groups
    mean = group_mean(x, group_ids, num_groups, validate=False)  # (N,)
    sq = group_sum((x - mean[group_ids]) ** 2, group_ids, num_groups, validate=False)  # (N,)
    dof = group_count(group_ids, num_groups, x.dtype, validate=False) - ddof  # (N,)
    return torch.where(dof > 0, sq / dof.clamp(min=1), torch.zeros_like(sq)).sqrt()


def _group_extreme(x: Tensor, group_ids: Tensor, num_groups: int | None, reduce: str, validate: bool = True) -> Tensor:
    n = _check_vector(x, group_ids, num_groups, validate)
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor for group_{reduce[1:]}, got {x.dtype}")
    fill = torch.finfo(x.dtype).min if reduce == "amax" else torch.finfo(x.dtype).max
    out = x.new_full((n,), fill).scatter_reduce_(0, group_ids, x, reduce=reduce, include_self=True)
    empty = group_count(group_ids, n, validate=False) == 0
    return out.masked_fill(empty, 0.0)


def group_max(x: Tensor, group_ids: Tensor, num_groups: int | None = None, *, validate: bool = True) -> Tensor:
    """``max_{g_i=k} x_i``; 0 for empty groups. Shapes: (B,) -> (num_groups,)."""
    return _group_extreme(x, group_ids, num_groups, "amax", validate)


def group_min(x: Tensor, group_ids: Tensor, num_groups: int | None = None, *, validate: bool = True) -> Tensor:
    """``min_{g_i=k} x_i``; 0 for empty groups. Shapes: (B,) -> (num_groups,)."""
    return _group_extreme(x, group_ids, num_groups, "amin", validate)


def group_median(x: Tensor, group_ids: Tensor, num_groups: int | None = None, *, validate: bool = True) -> Tensor:
    """Per-group median; for an even group the mean of the two middle values (numpy's convention;
    ``torch.median`` would return the lower one). 0 for empty groups. Shapes: (B,) -> (num_groups,).

    Vectorised by one lexicographic sort on (group, value): sort by value, then stable-sort by group, so
    group k occupies the sorted slice ``[start_k, start_k + n_k)`` and its middle elements are read directly.
    """
    n = _check_vector(x, group_ids, num_groups, validate)
    by_value = torch.argsort(x, stable=True)  # (B,)
    by_group = torch.argsort(group_ids[by_value], stable=True)  # (B,)
    sorted_x = x[by_value][by_group]  # (B,) grouped, ascending within each group
    count = group_count(group_ids, n, torch.long, validate=False)  # (N,)
    start = torch.cumsum(count, 0) - count  # (N,)
    last = sorted_x.numel() - 1
    lo = (start + (count - 1).clamp(min=0) // 2).clamp(max=max(last, 0))  # (N,)
    hi = (start + count // 2).clamp(max=max(last, 0))  # (N,)
    if sorted_x.numel() == 0:
        return x.new_zeros(n)
    median = 0.5 * (sorted_x[lo] + sorted_x[hi])  # (N,)
    return median.masked_fill(count == 0, 0.0)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``Σ x·m`` over ``dim`` (all if None). Positions outside the mask never contribute, even if NaN there."""
    if mask.shape != x.shape:
        raise ValueError(f"mask must have the shape of x {tuple(x.shape)}, got {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but x is on {x.device}; move both to one device")
    xm = torch.where(mask.bool(), x, torch.zeros_like(x))
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``Σ x·m / Σ m`` over ``dim``; 0 where the mask is empty (never NaN)."""
    total = masked_sum(x, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1).to(total.dtype)


_MIX1, _MIX2, _GOLDEN = -4658895280553007687, -7723592293110705685, -7046029254386353131  # splitmix64 constants (int64)


def _splitmix(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 (wrapping arithmetic; logical shifts emulated by masking the sign bits)."""
    x = (x ^ ((x >> 30) & 0x3FFFFFFFF)) * _MIX1
    x = (x ^ ((x >> 27) & 0x1FFFFFFFFF)) * _MIX2
    return x ^ ((x >> 31) & 0x1FFFFFFFF)


def seeded_uniform(seeds: Tensor, stream: int, shape: tuple[int, ...]) -> Tensor:
    """Counter-based uniforms in [0, 1): row b's values depend only on (seeds[b], stream, position), never on
    which other rows share the call. This is what makes a log-prob estimator's randomness (a masked-diffusion
    LM's mask, a diffusion step's noise) identical for old, reference and current log-probs of one inner epoch
    (``stream`` = the epoch) whatever the minibatch / micro-batch split. Shapes: seeds (B,) long -> (B, *shape)
    float32."""
    n = 1
    for s in shape:
        n *= s
    counter = torch.arange(n, device=seeds.device, dtype=torch.long)  # (N,)
    key = _splitmix(seeds.long() * _GOLDEN + int(stream))  # (B,)
    bits = _splitmix(key[:, None] + counter[None, :] * _GOLDEN)  # (B, N)
    return ((bits >> 40) & 0xFFFFFF).float().div_(1 << 24).view(seeds.shape[0], *shape)
