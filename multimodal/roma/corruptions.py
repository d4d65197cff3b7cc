"""Image corruptions for ROMA's robustness training and evaluation, each a pure function of (seed, sample, step, view).

ROMA ("Reinforcing Multimodal Reasoning Against Visual Degradation", arXiv 2605.09262) names blur, compression
artefacts and low-resolution scans, and a seen / unseen split; the exact list and severities are not public
(shared/methods/domains.md §4 (c), [UNVERIFIED]). Ours, five severity levels each (ImageNet-C style):

    seen     gaussian_blur   σ (px)          0.5  0.75 1.0  1.5  2.0     separable Gaussian, radius ⌈3σ⌉, edges replicated
             jpeg            quality (PIL)   40   30   20   15   10      libjpeg via PIL, per image (uint8 round trip)
             downscale       factor f        1.5  2    2.5  3    4       area-average to ⌈H/f⌉×⌈W/f⌉, bilinear back up
             gaussian_noise  σ (in [0,1])    0.04 0.08 0.12 0.16 0.20    x + σ·ξ, clamped to [0, 1]
    unseen   motion_blur     length k (px)   3    3    5    5    7       horizontal 1×k box filter, edges replicated
             contrast        c               0.6  0.5  0.4  0.3  0.2     (x − mean_image) · c + mean_image
             salt_pepper     fraction p      0.01 0.02 0.05 0.08 0.10    a pixel (all channels) set to 0 or 1 w.p. p
             pixelate        factor f        2    2    3    4    4       area-average down, nearest-neighbour up

Images are float ``(N, C, H, W)`` in [0, 1]. Randomness (which corruption, which level, the noise itself) comes from a
counter-based hash of the view's key ``key = h(seed, sample, step, view)`` (``view_keys``), never from a global RNG, so
a view is reproducible from what the batch records: ``(kind, level, key)`` per view, with ``describe`` naming the
corruption and its parameter. None of these corruptions moves pixels, so boxes and points are unchanged by them
(``moves_pixels`` is False for all); ``resize`` is the one geometric transform here and maps boxes and points with
the image (``scale_points``), which the down-up round trip tests check.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from common.ops import _splitmix, seeded_uniform

_GOLDEN = -7046029254386353131  # splitmix64's increment (int64), as in common.ops
NUM_LEVELS = 5


def _check_images(images: Tensor, name: str = "images") -> None:
    if not torch.is_tensor(images) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"{name} must be a float tensor (N, C, H, W) with values in [0, 1], got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")


def _per_value(images: Tensor, params: Tensor, fn: Callable[[Tensor, float], Tensor]) -> Tensor:
    """Apply ``fn(images_with_that_param, param)`` once per distinct parameter (at most NUM_LEVELS values, never one
    call per row). Shapes: images (N, C, H, W), params (N,) -> (N, C, H, W)."""
    out = torch.empty_like(images)
    for value in torch.unique(params).tolist():  # ok: loop over <= 5 severity values, not over rows
        rows = (params == value).nonzero().squeeze(1)
        out[rows] = fn(images[rows], float(value))
    return out


def gaussian_kernel1d(sigma: float) -> Tensor:
    """Normalised 1-D Gaussian weights w_d ∝ exp(−d²/(2σ²)), d = −r..r with r = ⌈3σ⌉. -> (2r + 1,) float64."""
    r = max(1, math.ceil(3 * sigma))
    d = torch.arange(-r, r + 1, dtype=torch.float64)
    w = torch.exp(-(d**2) / (2 * sigma**2))
    return w / w.sum()


def _separable(images: Tensor, kx: Tensor, ky: Tensor) -> Tensor:
    """Depthwise separable filter with replicated edges. Shapes: (N, C, H, W), kx (a,), ky (b,) -> (N, C, H, W)."""
    N, C, H, W = images.shape
    x = images.reshape(N * C, 1, H, W)
    kx, ky = kx.to(images), ky.to(images)
    rx, ry = kx.numel() // 2, ky.numel() // 2
    if rx:
        x = F.conv2d(F.pad(x, (rx, rx, 0, 0), mode="replicate"), kx.view(1, 1, 1, -1))
    if ry:
        x = F.conv2d(F.pad(x, (0, 0, ry, ry), mode="replicate"), ky.view(1, 1, -1, 1))
    return x.view(N, C, H, W)


def gaussian_blur(images: Tensor, sigma: Tensor, keys: Tensor | None = None) -> Tensor:
    """Separable Gaussian blur, σ per row (pixels). Shapes: (N, C, H, W), (N,) -> (N, C, H, W)."""
    return _per_value(images, sigma, lambda x, s: _separable(x, gaussian_kernel1d(s), gaussian_kernel1d(s)))


def jpeg(images: Tensor, quality: Tensor, keys: Tensor | None = None) -> Tensor:
    """JPEG compression through PIL (libjpeg, default 4:2:0 chroma subsampling for RGB) at ``quality`` per row:
    round to uint8, encode, decode. 1- or 3-channel images. Shapes: (N, C, H, W), (N,) -> (N, C, H, W)."""
    N, C, H, W = images.shape
    if C not in (1, 3):
        raise ValueError(f"jpeg needs 1- or 3-channel images, got C={C}")
    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, C)
    out = np.empty_like(pixels)
    for i, q in enumerate(quality.tolist()):  # ok: libjpeg codes one image at a time
        buf = io.BytesIO()
        Image.fromarray(pixels[i, ..., 0] if C == 1 else pixels[i]).save(buf, format="JPEG", quality=int(q))
        decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L" if C == 1 else "RGB"))
        out[i] = decoded.reshape(H, W, C)
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(images.device, images.dtype) / 255.0


def _down_size(H: int, W: int, factor: float) -> tuple[int, int]:
    return max(1, math.ceil(H / factor)), max(1, math.ceil(W / factor))


def downscale(images: Tensor, factor: Tensor, keys: Tensor | None = None) -> Tensor:
    """Low-resolution scan: area-average down by ``factor`` per row, bilinear back to (H, W). A constant image is
    unchanged. Shapes: (N, C, H, W), (N,) -> (N, C, H, W)."""
    H, W = images.shape[-2:]

    def one(x: Tensor, f: float) -> Tensor:
        small = F.interpolate(x, size=_down_size(H, W, f), mode="area")
        return F.interpolate(small, size=(H, W), mode="bilinear", align_corners=False)

    return _per_value(images, factor, one)


def pixelate(images: Tensor, factor: Tensor, keys: Tensor | None = None) -> Tensor:
    """Area-average down by ``factor``, nearest-neighbour back up (blocks). Shapes: (N, C, H, W), (N,) -> same."""
    H, W = images.shape[-2:]

    def one(x: Tensor, f: float) -> Tensor:
        return F.interpolate(F.interpolate(x, size=_down_size(H, W, f), mode="area"), size=(H, W), mode="nearest")

    return _per_value(images, factor, one)


def gaussian_normal(keys: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Standard normal noise per row from the row's key (Box-Muller on ``seeded_uniform``). (N,) -> (N, *shape)."""
    u = seeded_uniform(keys, 0, (2, *shape)).double()  # (N, 2, *shape) in [0, 1)
    u1 = (u[:, 0] * (1 << 24) + 0.5) / (1 << 24)  # (0, 1): log never sees 0
    return (torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u[:, 1])).float()


def gaussian_noise(images: Tensor, std: Tensor, keys: Tensor) -> Tensor:
    """x + σ ξ, ξ ~ N(0, I) from the row's key, clamped to [0, 1]. Shapes: (N, C, H, W), (N,), (N,) -> same."""
    xi = gaussian_normal(keys, tuple(images.shape[1:])).to(images)
    return (images + std.to(images)[:, None, None, None] * xi).clamp(0, 1)


def motion_blur(images: Tensor, length: Tensor, keys: Tensor | None = None) -> Tensor:
    """Horizontal motion blur: a 1×k box filter, edges replicated. Shapes: (N, C, H, W), (N,) -> same."""
    box = lambda k: torch.full((int(k),), 1.0 / int(k), dtype=torch.float64)  # noqa: E731
    return _per_value(images, length, lambda x, k: _separable(x, box(k), torch.ones(1, dtype=torch.float64)))


def contrast(images: Tensor, c: Tensor, keys: Tensor | None = None) -> Tensor:
    """(x − m)·c + m with m the image's mean over all pixels and channels. Shapes: (N, C, H, W), (N,) -> same."""
    m = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - m) * c.to(images)[:, None, None, None] + m


def salt_pepper(images: Tensor, p: Tensor, keys: Tensor) -> Tensor:
    """Each pixel (all channels together) becomes black or white with probability p, from the row's key.
    Shapes: (N, C, H, W), (N,), (N,) -> same."""
    N, C, H, W = images.shape
    u = seeded_uniform(keys, 1, (2, H, W)).to(images.device)  # (N, 2, H, W)
    hit = (u[:, 0] < p.to(u)[:, None, None])[:, None]  # (N, 1, H, W)
    value = (u[:, 1] < 0.5).to(images)[:, None].expand(N, C, H, W)
    return torch.where(hit, value, images)


@dataclass(frozen=True)
class Corruption:
    """One corruption family: its name, the name of its parameter and the parameter at severity 1..5."""

    name: str
    param: str
    levels: tuple[float, ...]
    fn: Callable[[Tensor, Tensor, Tensor], Tensor]
    moves_pixels: bool = False  # True only for a geometric transform (then boxes and points must move with it)


CORRUPTIONS: tuple[Corruption, ...] = (
    Corruption("gaussian_blur", "sigma", (0.5, 0.75, 1.0, 1.5, 2.0), gaussian_blur),
    Corruption("jpeg", "quality", (40, 30, 20, 15, 10), jpeg),
    Corruption("downscale", "factor", (1.5, 2.0, 2.5, 3.0, 4.0), downscale),
    Corruption("gaussian_noise", "std", (0.04, 0.08, 0.12, 0.16, 0.20), gaussian_noise),
    Corruption("motion_blur", "length", (3, 3, 5, 5, 7), motion_blur),
    Corruption("contrast", "c", (0.6, 0.5, 0.4, 0.3, 0.2), contrast),
    Corruption("salt_pepper", "p", (0.01, 0.02, 0.05, 0.08, 0.10), salt_pepper),
    Corruption("pixelate", "factor", (2, 2, 3, 4, 4), pixelate),
)
NAMES: tuple[str, ...] = tuple(c.name for c in CORRUPTIONS)
SEEN: tuple[str, ...] = NAMES[:4]
UNSEEN: tuple[str, ...] = NAMES[4:]


def kind_ids(names: Sequence[str], argument: str = "names") -> Tensor:
    """Corruption names -> their ids (indices into CORRUPTIONS), one-line error naming an unknown one. -> (K,)."""
    if isinstance(names, str):
        names = SEEN if names == "seen" else UNSEEN if names == "unseen" else (names,)
    unknown = [n for n in names if n not in NAMES]
    if unknown or not names:
        raise ValueError(f"{argument} must be a non-empty list of corruption names from {list(NAMES)} (or 'seen' / "
                         f"'unseen'), got {list(names)}")
    return torch.tensor([NAMES.index(n) for n in names], dtype=torch.long)


_LEVEL_TABLE = torch.tensor([c.levels for c in CORRUPTIONS], dtype=torch.float64)  # (8, 5)


def parameters(kinds: Tensor, levels: Tensor) -> Tensor:
    """The corruption parameter of each view (σ, quality, factor, ...). Shapes: kinds, levels (...) long, levels in
    1..5 -> (...) float64."""
    return _LEVEL_TABLE[kinds.cpu(), levels.cpu() - 1].to(kinds.device)


def describe(kind: int, level: int, key: int | None = None) -> dict:
    """A view as a plain record: ``{"corruption": name, "level": l, <param>: value, "key": key}``."""
    c = CORRUPTIONS[int(kind)]
    out = {"corruption": c.name, "level": int(level), c.param: float(c.levels[int(level) - 1])}
    return out if key is None else {**out, "key": int(key)}


def view_keys(seed: int, samples: Tensor, step: int | Tensor, num_views: int) -> Tensor:
    """The key of every view: a hash of (seed, sample, step, view), the only source of a view's randomness.
    Shapes: samples (N,) long (a sample's identity) -> (N, num_views) long, non-negative."""
    step = torch.as_tensor(step, dtype=torch.long, device=samples.device)
    h = _splitmix(torch.full_like(samples.long(), int(seed)) * _GOLDEN + samples.long())  # (N,)
    h = _splitmix(h * _GOLDEN + step)
    views = torch.arange(num_views, dtype=torch.long, device=samples.device)  # (K,)
    return _splitmix(h[:, None] * _GOLDEN + views[None, :]) & 0x7FFFFFFFFFFFFFFF  # (N, K)


def draw_views(keys: Tensor, allowed: Tensor, min_level: int = 1, max_level: int = NUM_LEVELS) -> tuple[Tensor, Tensor]:
    """Kind (uniform over ``allowed`` ids) and level (uniform in [min_level, max_level]) of each view, from its key.
    Shapes: keys (...) long, allowed (K,) long -> kinds (...), levels (...) long."""
    if not 1 <= min_level <= max_level <= NUM_LEVELS:
        raise ValueError(f"severity levels must satisfy 1 <= min_level <= max_level <= {NUM_LEVELS}, got "
                         f"[{min_level}, {max_level}]")
    u = seeded_uniform(keys.reshape(-1), 2, (2,)).view(*keys.shape, 2)  # (..., 2)
    allowed = allowed.to(keys.device)
    kinds = allowed[(u[..., 0] * allowed.numel()).long().clamp(max=allowed.numel() - 1)]
    span = max_level - min_level + 1
    levels = min_level + (u[..., 1] * span).long().clamp(max=span - 1)
    return kinds, levels


def corrupt(images: Tensor, kinds: Tensor, levels: Tensor, keys: Tensor) -> Tensor:
    """Apply view i's corruption ``kinds[i]`` at ``levels[i]`` with randomness from ``keys[i]``: a pure function of
    its arguments. Shapes: images (N, C, H, W) float in [0, 1]; kinds, levels, keys (N,) long -> (N, C, H, W)."""
    _check_images(images)
    N = images.shape[0]
    for name, t in (("kinds", kinds), ("levels", levels), ("keys", keys)):
        if t.shape != (N,):
            raise ValueError(f"{name} must be (N,) = ({N},) for images of shape {tuple(images.shape)}, got {tuple(t.shape)}")
    if N and (int(kinds.min()) < 0 or int(kinds.max()) >= len(CORRUPTIONS)):
        raise ValueError(f"kinds must be corruption ids in [0, {len(CORRUPTIONS)}), got {kinds.tolist()}")
    if N and (int(levels.min()) < 1 or int(levels.max()) > NUM_LEVELS):
        raise ValueError(f"levels must be severities in [1, {NUM_LEVELS}], got {levels.tolist()}")
    params = parameters(kinds, levels).to(images.device)  # (N,)
    out = images.clone()
    for kind in torch.unique(kinds).tolist():  # ok: at most 8 corruption kinds, not rows
        rows = (kinds == kind).nonzero().squeeze(1).to(images.device)
        out[rows] = CORRUPTIONS[kind].fn(images[rows], params[rows], keys.to(images.device)[rows]).to(images.dtype)
    return out


# ---------------------------------------------------------------------------------------------- geometry
def scale_points(points: Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> Tensor:
    """Map pixel coordinates (x, y), in the continuous convention where pixel j covers [j, j + 1), from an image of
    size (H, W) to one of size (H', W') resized over the same field of view: x' = x·W'/W, y' = y·H'/H.
    Boxes (x0, y0, x1, y1) are two points. Shapes: (..., 2k) -> (..., 2k)."""
    if points.shape[-1] % 2:
        raise ValueError(f"points must have an even last dimension (x, y pairs), got shape {tuple(points.shape)}")
    (H, W), (H2, W2) = from_size, to_size
    scale = torch.tensor([W2 / W, H2 / H], dtype=points.dtype, device=points.device).repeat(points.shape[-1] // 2)
    return points * scale


def resize(images: Tensor, size: tuple[int, int], boxes: Tensor | None = None, mode: str = "area") -> tuple[Tensor, Tensor | None]:
    """Resize images to ``size`` and move boxes / points (x, y pairs, pixel units) with them.
    Shapes: images (N, C, H, W), boxes (N, M, 2k) or None -> (N, C, H', W'), (N, M, 2k) or None."""
    _check_images(images)
    H, W = images.shape[-2:]
    kwargs = {} if mode in ("area", "nearest") else {"align_corners": False}
    out = F.interpolate(images, size=tuple(size), mode=mode, **kwargs)
    return out, (scale_points(boxes, (H, W), tuple(size)) if boxes is not None else None)


__all__ = ["CORRUPTIONS", "Corruption", "NAMES", "NUM_LEVELS", "SEEN", "UNSEEN", "contrast", "corrupt", "describe",
           "downscale", "draw_views", "gaussian_blur", "gaussian_kernel1d", "gaussian_noise", "gaussian_normal", "jpeg",
           "kind_ids", "motion_blur", "parameters", "pixelate", "resize", "salt_pepper", "scale_points", "view_keys"]
