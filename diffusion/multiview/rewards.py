"""Computable rewards for the synthetic multiview objects (domains.md §2(e), §3(e)), and reward-hacking tripwires.

Every function works on images in [0, 1] shaped ``(B, Nv, 3, H, W)`` (one view: ``Nv = 1``) and the objects'
attributes (rows of ``render.templates``), with no Python loop over the batch:

- :func:`view_fidelity` (per-view caption alignment, ``(B, Nv)`` in [0, 1]) — §2(e)'s
  ``R(x^v, c) = 1 − ½·‖body colour of the object pixels − caption colour‖/√3 − ½·(1 − IoU(object mask, template))``,
  with the template the caption's canonical render *at that view* and the body colour the per-channel median of
  the object pixels (a median, so the accent stripe does not count against the body colour: the true render scores
  exactly 1).
- :func:`joint_consistency` (joint-view consistency, ``(B,)`` in [0, 1], caption-free) — each view is compared with
  the view that the *other* views imply: analysis by synthesis, the object (of the renderer's 120) whose renders best
  fit the other ``Nv − 1`` views (least squared error) is rendered at the left-out view, and the view scores the
  mean of ``1 − ‖x − x̂‖/√3`` over the pixels where either shows an object. A set of views of one object scores
  1; a view whose colour, silhouette or stripe contradicts the others scores less, whatever the caption, so the
  reward rewards agreement *across* views and cannot be raised by improving views one at a time (§2(e)).
- :func:`detect_attributes`, :func:`attribute_accuracy`: an exact attribute detector (nearest palette colour of the
  body, best-matching shape silhouette at that view) — an evaluation metric.
- :func:`preference_iou` (§3(e)'s hidden human preference ``h(x, c)``): IoU of the object mask with the caption's
  large, centred, saturated rendering.
- Tripwires, logged as metrics: :func:`high_frequency_energy`, :func:`grid_energy`, :func:`group_diversity`.

The :class:`~common.rewards.base.RewardFunction` wrappers read each row's decoded images from its sample dict
(``samples[i][image_key]``, a tensor ``(Nv, 3, H, W)`` or ``(3, H, W)`` in ``value_range``) and its attributes
(``shape``, ``body``, ``accent``); the completions (text) are unused. Degenerate images (all background, NaN) score 0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common.ops import group_count
from common.rewards.base import RewardFunction
from diffusion.multiview.render import (AZIMUTHS, BACKGROUND, CANONICAL, COLOURS, PREFERRED, SHAPES, ObjectSpec, Style,
                                        all_objects, object_index, templates)

OBJECT_THRESHOLD = 0.2  # a pixel is object when its colour is this far (L2) from the background grey
_SQRT3 = math.sqrt(3.0)
_PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # (6, 3)
_BODY = torch.tensor([list(COLOURS).index(o.body) for o in all_objects()])  # (120,) palette index of each object
_SHAPE = torch.tensor([SHAPES.index(o.shape) for o in all_objects()])  # (120,)


def _check_images(images: Tensor, name: str = "images") -> Tensor:
    if images.dim() != 5 or images.shape[2] != 3:
        raise ValueError(f"{name} must be (B, Nv, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    return torch.nan_to_num(images.float(), nan=BACKGROUND).clamp(0, 1)  # NaN pixels read as background


def _templates(images: Tensor, azimuths: Sequence[float], style=None) -> tuple[Tensor, Tensor]:
    """The canonical renders matching ``images``' size and views: (120, Nv, 3, H, W) float, (120, Nv, H, W) bool."""
    Nv, H, W = images.shape[1], images.shape[3], images.shape[4]
    if len(azimuths) != Nv or H != W:
        raise ValueError(f"images have {Nv} views of {H}x{W}; expected square views, one per azimuth {list(azimuths)}")
    t, m = _torch_templates(H, tuple(float(a) for a in azimuths), PREFERRED if style is PREFERRED else CANONICAL)
    return t.to(images.device), m.to(images.device)


@functools.lru_cache(maxsize=16)
def _torch_templates(size: int, azimuths: tuple[float, ...], style: Style) -> tuple[Tensor, Tensor]:
    t, m = templates(size, azimuths, style)
    return torch.from_numpy(np.array(t)), torch.from_numpy(np.array(m))


def object_mask(images: Tensor, threshold: float = OBJECT_THRESHOLD) -> Tensor:
    """(..., 3, H, W) -> (..., H, W) bool: pixels farther than ``threshold`` from the background grey."""
    return (images - BACKGROUND).norm(dim=-3) > threshold


def body_colour(images: Tensor, mask: Tensor) -> Tensor:
    """Per-channel median of the masked pixels: (..., 3, H, W), (..., H, W) -> (..., 3); the background grey where
    the mask is empty."""
    x = images.flatten(-2).masked_fill(~mask.flatten(-2).unsqueeze(-2), float("nan"))  # (..., 3, H·W)
    med = x.nanmedian(dim=-1).values  # (..., 3)
    return torch.nan_to_num(med, nan=BACKGROUND)


def _iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of bool masks over the last two dims; 0 where both are empty."""
    inter = (a & b).flatten(-2).sum(-1).float()
    union = (a | b).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))


def object_rows(samples: Sequence[Mapping[str, Any]]) -> Tensor:
    """(B,) long: each sample's object (``shape``, ``body``, ``accent``) as a row of ``render.templates``."""
    try:
        return torch.tensor([object_index(ObjectSpec(s["shape"], s["body"], s["accent"])) for s in samples],
                            dtype=torch.long)
    except KeyError as e:
        raise ValueError(f"samples must carry the object's 'shape', 'body' and 'accent', missing {e}") from None


def view_fidelity(images: Tensor, rows: Tensor, azimuths: Sequence[float] = AZIMUTHS) -> Tensor:
    """Per-view caption alignment (module docstring). images (B, Nv, 3, H, W) in [0, 1], rows (B,) -> (B, Nv)."""
    x = _check_images(images)
    _, tmasks = _templates(x, azimuths)
    mask = object_mask(x)  # (B, Nv, H, W)
    target = _PALETTE.to(x.device)[_BODY.to(x.device)[rows]]  # (B, 3)
    colour_err = (body_colour(x, mask) - target[:, None]).norm(dim=-1) / _SQRT3  # (B, Nv)
    iou = _iou(mask, tmasks[rows])  # (B, Nv)
    return (1 - 0.5 * colour_err.clamp(max=1) - 0.5 * (1 - iou)).clamp(0, 1)


def implied_views(images: Tensor, azimuths: Sequence[float] = AZIMUTHS) -> tuple[Tensor, Tensor, Tensor]:
    """For each view, the view the other views imply: the object that best fits the other ``Nv − 1`` views (least
    summed squared error over their pixels), rendered at this view. Returns its images (B, Nv, 3, H, W), masks
    (B, Nv, H, W) and the object rows (B, Nv). With one view, the object that best fits that view itself."""
    x = _check_images(images)
    timgs, tmasks = _templates(x, azimuths)
    B, Nv = x.shape[:2]
    xf, tf = x.flatten(2), timgs.flatten(2)  # (B, Nv, D), (K, Nv, D)
    sq = (xf * xf).sum(-1)[:, :, None] + (tf * tf).sum(-1).T[None] - 2 * torch.einsum("bvd,kvd->bvk", xf, tf)  # (B, Nv, K)
    loo = sq.sum(1, keepdim=True) - sq if Nv > 1 else sq  # (B, Nv, K): error on the other views
    best = loo.argmin(-1)  # (B, Nv)
    view = torch.arange(Nv, device=x.device).expand(B, Nv)
    return timgs[best, view], tmasks[best, view], best


def joint_consistency(images: Tensor, azimuths: Sequence[float] = AZIMUTHS) -> Tensor:
    """Joint-view consistency (module docstring): (B, Nv, 3, H, W) in [0, 1] -> (B,) in [0, 1]."""
    return view_consistency(images, azimuths).mean(1)


def view_consistency(images: Tensor, azimuths: Sequence[float] = AZIMUTHS) -> Tensor:
    """Each view's agreement with the view the others imply: (B, Nv, 3, H, W) -> (B, Nv) in [0, 1]."""
    x = _check_images(images)
    pred, pmask, _ = implied_views(x, azimuths)
    union = object_mask(x) | pmask  # (B, Nv, H, W); never empty (a template always shows the object)
    agree = 1 - ((x - pred).norm(dim=2) / _SQRT3).clamp(max=1)  # (B, Nv, H, W)
    return (agree * union).flatten(2).sum(-1) / union.flatten(2).sum(-1).clamp(min=1)


def detect_attributes(images: Tensor, azimuths: Sequence[float] = AZIMUTHS) -> tuple[Tensor, Tensor]:
    """An exact attribute detector: per view, the body colour (palette index nearest to the object pixels' median,
    (B, Nv) long) and the shape (index into ``render.SHAPES`` whose canonical silhouette at that view has the highest
    IoU with the object mask, (B, Nv) long)."""
    x = _check_images(images)
    _, tmasks = _templates(x, azimuths)
    mask = object_mask(x)
    colour = (body_colour(x, mask)[..., None, :] - _PALETTE.to(x.device)).norm(dim=-1).argmin(-1)  # (B, Nv)
    firsts = torch.tensor([int((_SHAPE == s).nonzero()[0]) for s in range(len(SHAPES))], device=x.device)
    shape_masks = tmasks[firsts]  # (S, Nv, H, W): silhouettes do not depend on colours
    iou = _iou(mask[:, None], shape_masks[None])  # (B, S, Nv)
    return colour, iou.argmax(1)


def attribute_accuracy(images: Tensor, rows: Tensor, azimuths: Sequence[float] = AZIMUTHS) -> Tensor:
    """(B,): fraction of views whose detected body colour and shape are the caption's."""
    colour, shape = detect_attributes(images, azimuths)
    ok = (colour == _BODY.to(colour.device)[rows][:, None]) & (shape == _SHAPE.to(shape.device)[rows][:, None])
    return ok.float().mean(1)


def preference_iou(images: Tensor, rows: Tensor, azimuths: Sequence[float] = (0.0,)) -> Tensor:
    """§3(e)'s hidden preference h(x, c): mean over views of the IoU of the object mask with the caption's preferred
    (large, centred, saturated) rendering. (B, Nv, 3, H, W), (B,) -> (B,)."""
    x = _check_images(images)
    _, pmasks = _templates(x, azimuths, PREFERRED)
    return _iou(object_mask(x), pmasks[rows]).mean(1)


# ---------------------------------------------------------------------------------------------- tripwires (metrics)
def _power(images: Tensor) -> Tensor:
    x = images.float()
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    return torch.fft.fft2(x).abs().square()  # (..., H, W)


def high_frequency_energy(images: Tensor) -> Tensor:
    """Fraction of the (mean-removed) spectral energy at spatial frequencies with max(|f_y|, |f_x|) >= 1/4 cycle per
    pixel (the upper half band): noise-like or adversarial texture raises it. (B, ..., H, W) -> (B,); 0 for flat."""
    p = _power(images)
    H, W = p.shape[-2:]
    fy, fx = torch.fft.fftfreq(H).abs(), torch.fft.fftfreq(W).abs()
    high = (torch.maximum(fy[:, None], fx[None, :]) >= 0.25).to(p.device)  # (H, W)
    tot = p.flatten(1).sum(1)
    return torch.where(tot > 0, (p * high).flatten(1).sum(1) / tot.clamp(min=1e-30), torch.zeros_like(tot))


def grid_energy(images: Tensor) -> Tensor:
    """Fraction of the spectral energy at the Nyquist row or column (period-2 stripes and checkerboards, the grid
    artefacts of a hacked decoder). (B, ..., H, W) -> (B,); 0 for flat images."""
    p = _power(images)
    H, W = p.shape[-2:]
    ny = torch.zeros(H, W, dtype=torch.bool, device=p.device)
    if H % 2 == 0:
        ny[H // 2] = True
    if W % 2 == 0:
        ny[:, W // 2] = True
    tot = p.flatten(1).sum(1)
    return torch.where(tot > 0, (p * ny).flatten(1).sum(1) / tot.clamp(min=1e-30), torch.zeros_like(tot))


def group_diversity(images: Tensor, group_ids: Tensor, num_groups: int | None = None) -> Tensor:
    """Within-group diversity: the RMS pixel distance between two different samples of the row's group,
    sqrt(E_{i≠j} mean_px (x_i − x_j)²) = sqrt(2n/(n−1) · mean_i mean_px (x_i − x̄)²); a collapsed group gives 0,
    a size-1 group 0. (B, ...) images, (B,) group ids -> (B,)."""
    x = images.float().flatten(1)  # (B, D)
    n = group_count(group_ids, num_groups, dtype=x.dtype)  # (P,)
    P = n.shape[0]
    sums = torch.zeros(P, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, group_ids, x)  # (P, D)
    centre = (sums / n.clamp(min=1)[:, None])[group_ids]  # (B, D)
    dev = (x - centre).square().mean(1)  # (B,)
    var = torch.zeros(P, dtype=x.dtype, device=x.device).index_add_(0, group_ids, dev) / n.clamp(min=1)  # (P,)
    pair = torch.where(n > 1, 2 * n / (n - 1).clamp(min=1) * var, torch.zeros_like(var))
    return pair.sqrt()[group_ids]


# ---------------------------------------------------------------------------------------------- RewardFunctions
def images_from_samples(samples: Sequence[Mapping[str, Any]], key: str = "images",
                        value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Stack each sample's decoded images ``samples[i][key]`` ((Nv, 3, H, W) or (3, H, W), values in
    ``value_range``) into (B, Nv, 3, H, W) in [0, 1]."""
    if not samples:
        return torch.zeros(0, 1, 3, 1, 1)
    try:
        imgs = torch.stack([torch.as_tensor(s[key]).detach().float().cpu() for s in samples])
    except KeyError:
        raise ValueError(f"each sample must carry its decoded images under {key!r} (the diffusion policy's rollout "
                         "puts them there)") from None
    if imgs.dim() == 4:
        imgs = imgs[:, None]
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    return ((imgs - lo) / (hi - lo)).clamp(0, 1)


class _ImageReward(RewardFunction):
    def __init__(self, azimuths: Sequence[float] = AZIMUTHS, image_key: str = "images",
                 value_range: tuple[float, float] = (-1.0, 1.0)):
        self.azimuths, self.image_key, self.value_range = tuple(float(a) for a in azimuths), image_key, tuple(value_range)

    def images(self, samples: Sequence[Mapping[str, Any]]) -> Tensor:
        return images_from_samples(samples, self.image_key, self.value_range)


class ViewAlignment(_ImageReward):
    """Per-view caption alignment, averaged over the views: (B,) in [0, 1] (:func:`view_fidelity`)."""

    name = "alignment"

    def __call__(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> Tensor:
        if not samples:
            return torch.zeros(0)
        return view_fidelity(self.images(samples), object_rows(samples), self.azimuths).mean(1)


class JointConsistency(_ImageReward):
    """Joint-view consistency: (B,) in [0, 1] (:func:`joint_consistency`); needs Nv >= 2."""

    name = "consistency"

    def __call__(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> Tensor:
        if not samples:
            return torch.zeros(0)
        return joint_consistency(self.images(samples), self.azimuths)


class AttributeAccuracy(_ImageReward):
    """Fraction of views with the caption's body colour and shape (:func:`attribute_accuracy`): (B,)."""

    name = "attribute_accuracy"

    def __call__(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> Tensor:
        if not samples:
            return torch.zeros(0)
        return attribute_accuracy(self.images(samples), object_rows(samples), self.azimuths)


class PreferenceIoU(_ImageReward):
    """§3(e)'s hidden preference h(x, c) on single-view images (:func:`preference_iou`): (B,)."""

    name = "preference_iou"

    def __init__(self, azimuths: Sequence[float] = (0.0,), image_key: str = "images",
                 value_range: tuple[float, float] = (-1.0, 1.0)):
        super().__init__(azimuths, image_key, value_range)

    def __call__(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> Tensor:
        if not samples:
            return torch.zeros(0)
        return preference_iou(self.images(samples), object_rows(samples), self.azimuths)


def tripwires(images: Tensor, group_ids: Tensor) -> dict[str, Tensor]:
    """The reward-hacking tripwires as batch means (scalars): ``hf_energy``, ``grid_energy``, ``group_diversity``.
    images (B, Nv, 3, H, W) in [0, 1]."""
    return {"hf_energy": high_frequency_energy(images).mean(), "grid_energy": grid_energy(images).mean(),
            "group_diversity": group_diversity(images, group_ids).mean()}


__all__ = ["AttributeAccuracy", "JointConsistency", "OBJECT_THRESHOLD", "PreferenceIoU", "ViewAlignment",
           "attribute_accuracy", "body_colour", "detect_attributes", "grid_energy", "group_diversity",
           "high_frequency_energy", "images_from_samples", "implied_views", "joint_consistency", "object_mask",
           "object_rows", "preference_iou", "tripwires", "view_consistency", "view_fidelity"]
