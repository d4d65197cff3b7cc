"""A small numpy ray-caster of coloured 3D primitives, seen from ``Nv`` known camera azimuths (domains.md §2(e),
the 3D version of its synthetic multiview objects; §3(e) uses one view).

An object is a primitive (cube, sphere, cylinder, cone) in a flat *body* colour with a vertical *accent* stripe
painted on its front (object +z) half: the surface points with ``|x| < STRIPE_HALF_WIDTH`` and ``z > 0``. Orthographic
cameras at elevation ``ELEVATION`` deg look at the origin from azimuths ``AZIMUTHS`` (0/90/180/270); the object is
turned by ``YAW`` = 30 deg, so the stripe faces views 0 and 1 (at different image columns) and is hidden in views 2
and 3 — the view reasoning of §2(e)'s moving stripe, and the cube's silhouette changes with the view. Colours are
exact (no shading, no anti-aliasing): a body pixel holds the body colour, a stripe pixel the accent colour, the
background is grey ``BACKGROUND``. Rendering is deterministic; randomness only enters through
:func:`random_style`'s generator (size, position, yaw and saturation jitter for the pre-training and "winner" images).

Images are float32 in [0, 1], shaped ``(Nv, 3, H, W)`` per object and ``(N, Nv, 3, H, W)`` per batch; the diffusion
model sees ``2x - 1`` (:func:`to_model_space`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SHAPES = ("cube", "sphere", "cylinder", "cone")
COLOURS = {  # the palette: pairwise distances >= 1, distance to the background sqrt(0.75)
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0),
}
BACKGROUND = 0.5  # grey
AZIMUTHS = (0.0, 90.0, 180.0, 270.0)  # deg, the Nv = 4 views
ELEVATION = 25.0  # deg
YAW = 30.0  # deg, the object's turn about the vertical axis
EXTENT = 1.0  # the image spans [-EXTENT, EXTENT] in both directions of the image plane
STRIPE_HALF_WIDTH = 0.16
SINGLE_VIEW_AZIMUTH = (0.0,)  # the view of the single-view (SePPO) images


@dataclass(frozen=True)
class Style:
    """How an object is drawn beyond its caption: ``scale`` of the primitive, ``shift`` (dx, dy) in image-plane
    units, ``yaw`` (deg), ``saturation`` in (0, 1] (1 = palette colours; s mixes each colour toward its channel
    mean: ``s·c + (1 − s)·mean(c)``). The default is the canonical rendering every reward compares with."""

    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)
    yaw: float = YAW
    saturation: float = 1.0


CANONICAL = Style()
PREFERRED = Style(scale=1.3)  # §3(e)'s hidden preference: large, centred, saturated


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    body: str
    accent: str

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        for name in ("body", "accent"):
            if getattr(self, name) not in COLOURS:
                raise ValueError(f"{name} must be one of {tuple(COLOURS)}, got {getattr(self, name)!r}")

    @property
    def caption(self) -> str:
        return caption(self.shape, self.body, self.accent)


def caption(shape: str, body: str, accent: str) -> str:
    return f"a {body} {shape} with a {accent} stripe"


def all_objects() -> list[ObjectSpec]:
    """Every (shape, body, accent) with accent != body: 4 x 6 x 5 = 120 objects, in a fixed order."""
    return [ObjectSpec(s, b, a) for s, b, a in itertools.product(SHAPES, COLOURS, COLOURS) if a != b]


def _colour(name: str, saturation: float) -> np.ndarray:
    c = np.asarray(COLOURS[name], dtype=np.float64)
    return saturation * c + (1.0 - saturation) * c.mean()


def _camera(azimuth: float, elevation: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors (towards the camera, image right, image up) of an orthographic camera looking at the origin."""
    a, e = np.deg2rad(azimuth), np.deg2rad(elevation)
    back = np.array([np.sin(a) * np.cos(e), np.sin(e), np.cos(a) * np.cos(e)])
    right = np.array([np.cos(a), 0.0, -np.sin(a)])
    return back, right, np.cross(back, right)


def _solve_quadratic(A: np.ndarray, B: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Roots of A t² + 2B t + C = 0 (both NaN where there is none; a linear root where A ~ 0). Shapes (N,)."""
    disc = B * B - A * C
    ok = disc >= 0
    sq = np.sqrt(np.where(ok, disc, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        small = np.abs(A) < 1e-12
        t1 = np.where(small, -C / (2 * B), (-B - sq) / A)
        t2 = np.where(small, np.nan, (-B + sq) / A)
    return np.where(ok, t1, np.nan), np.where(ok, t2, np.nan)


def _nearest(*candidates: np.ndarray) -> np.ndarray:
    """The smallest positive candidate per ray (inf where none). Shapes (N,) each -> (N,)."""
    t = np.stack(candidates)  # (k, N)
    t = np.where(np.isfinite(t) & (t > 1e-9), t, np.inf)
    return t.min(0)


def _intersect(shape: str, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Ray parameter of the first hit of each ray ``o + t d`` with the unit-size primitive (inf = miss). o, d (N, 3)."""
    ox, oy, oz = o.T
    dx, dy, dz = d.T
    with np.errstate(divide="ignore", invalid="ignore"):
        if shape == "sphere":
            r = 0.62
            t, _ = _solve_quadratic((d * d).sum(1), (o * d).sum(1), (o * o).sum(1) - r * r)
            return _nearest(t)
        if shape == "cube":
            a = 0.5
            t1, t2 = (-a - o) / d, (a - o) / d  # (N, 3)
            tmin = np.nanmax(np.minimum(t1, t2), 1)
            tmax = np.nanmin(np.maximum(t1, t2), 1)
            return np.where((tmax >= tmin) & (tmax > 0), np.where(tmin > 0, tmin, np.inf), np.inf)
        if shape == "cylinder":
            r, h = 0.5, 0.55
            ts = _solve_quadratic(dx * dx + dz * dz, ox * dx + oz * dz, ox * ox + oz * oz - r * r)
            side = [np.where(np.abs(oy + t * dy) <= h, t, np.nan) for t in ts]
            caps = []
            for y0 in (-h, h):
                t = (y0 - oy) / dy
                caps.append(np.where((ox + t * dx) ** 2 + (oz + t * dz) ** 2 <= r * r, t, np.nan))
            return _nearest(*side, *caps)
        if shape == "cone":
            R, h = 0.62, 0.6  # base radius at y = -h, apex at y = +h
            k2 = (R / (2 * h)) ** 2
            ts = _solve_quadratic(dx * dx + dz * dz - k2 * dy * dy, ox * dx + oz * dz + k2 * (h - oy) * dy,
                                  ox * ox + oz * oz - k2 * (h - oy) ** 2)
            side = [np.where(np.abs(oy + t * dy) <= h, t, np.nan) for t in ts]
            t = (-h - oy) / dy
            base = np.where((ox + t * dx) ** 2 + (oz + t * dz) ** 2 <= R * R, t, np.nan)
            return _nearest(*side, base)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


@dataclass
class Render:
    images: np.ndarray  # (Nv, 3, H, W) float32 in [0, 1]
    mask: np.ndarray  # (Nv, H, W) bool: object pixels
    stripe: np.ndarray  # (Nv, H, W) bool: accent pixels (a subset of mask)


def render(obj: ObjectSpec, size: int = 16, azimuths: Sequence[float] = AZIMUTHS, style: Style = CANONICAL,
           elevation: float = ELEVATION) -> Render:
    """Render ``obj`` from each azimuth at ``size`` x ``size`` pixels (see the module docstring)."""
    if size < 4:
        raise ValueError(f"size must be >= 4 pixels, got {size}")
    if not 0 < style.saturation <= 1 or style.scale <= 0:
        raise ValueError(f"style needs saturation in (0, 1] and scale > 0, got {style}")
    centres = EXTENT * ((np.arange(size) + 0.5) / size * 2 - 1)  # (W,)
    u = centres[None, :] - style.shift[0]  # (1, W) image right
    v = -centres[:, None] - style.shift[1]  # (H, 1) image up (row 0 at the top)
    yaw = np.deg2rad(style.yaw)
    rot = np.array([[np.cos(yaw), 0, -np.sin(yaw)], [0, 1, 0], [np.sin(yaw), 0, np.cos(yaw)]])  # world -> object
    body, accent = _colour(obj.body, style.saturation), _colour(obj.accent, style.saturation)
    images, masks, stripes = [], [], []
    for az in azimuths:  # ok: Nv views, each vectorised over its pixels
        back, right, up = _camera(az, elevation)
        o = (u[..., None] * right + v[..., None] * up + 3.0 * back).reshape(-1, 3)  # (H·W, 3) ray origins
        d = np.broadcast_to(-back, o.shape)
        o_obj, d_obj = (o @ rot.T) / style.scale, d @ rot.T / style.scale  # the object frame, unit-size primitive
        t = _intersect(obj.shape, o_obj, d_obj)  # (H·W,)
        hit = np.isfinite(t)
        p = o_obj + np.where(hit, t, 0.0)[:, None] * d_obj
        stripe = hit & (np.abs(p[:, 0]) < STRIPE_HALF_WIDTH) & (p[:, 2] > 0)
        img = np.full((size * size, 3), BACKGROUND)
        img[hit] = body
        img[stripe] = accent
        images.append(img.T.reshape(3, size, size))
        masks.append(hit.reshape(size, size))
        stripes.append(stripe.reshape(size, size))
    return Render(np.stack(images).astype(np.float32), np.stack(masks), np.stack(stripes))


def render_batch(objs: Sequence[ObjectSpec], size: int = 16, azimuths: Sequence[float] = AZIMUTHS,
                 styles: Sequence[Style] | None = None) -> np.ndarray:
    """(N, Nv, 3, H, W) float32 images of ``objs`` (canonical style unless ``styles`` gives one per object)."""
    styles = [CANONICAL] * len(objs) if styles is None else list(styles)
    if len(styles) != len(objs):
        raise ValueError(f"styles must have one entry per object ({len(objs)}), got {len(styles)}")
    if not objs:
        return np.zeros((0, len(azimuths), 3, size, size), np.float32)
    return np.stack([render(o, size, azimuths, s).images for o, s in zip(objs, styles)])


@functools.lru_cache(maxsize=16)
def templates(size: int = 16, azimuths: tuple[float, ...] = AZIMUTHS, style: Style = CANONICAL) -> tuple[np.ndarray, np.ndarray]:
    """Renders of :func:`all_objects` in ``style``: images (120, Nv, 3, H, W) float32 and masks (120, Nv, H, W) bool
    (cached; read-only)."""
    rs = [render(o, size, azimuths, style) for o in all_objects()]
    imgs, masks = np.stack([r.images for r in rs]), np.stack([r.mask for r in rs])
    imgs.flags.writeable = masks.flags.writeable = False
    return imgs, masks


def object_index(obj: ObjectSpec) -> int:
    """Position of ``obj`` in :func:`all_objects` (the row of :func:`templates`)."""
    return _INDEX[obj]


_INDEX = {o: i for i, o in enumerate(all_objects())}


def random_style(rng: np.random.Generator, kind: str = "broad") -> Style:
    """A random style: ``"broad"`` (§3(e)'s pre-training distribution: scale 0.6-1.3, shift up to 0.3, any yaw,
    saturation 0.4-1), ``"winner"`` (the preferred style with small jitter: scale 1.25-1.35, shift up to 0.05,
    yaw 30 ± 5 deg, saturation 0.9-1) or ``"jitter"`` (mild multiview pre-training jitter: scale 0.9-1.1,
    shift up to 0.08, yaw 30 ± 10 deg, saturated)."""
    if kind == "broad":
        return Style(float(rng.uniform(0.6, 1.3)), tuple(float(x) for x in rng.uniform(-0.3, 0.3, 2)),
                     float(rng.uniform(0, 360)), float(rng.uniform(0.4, 1.0)))
    if kind == "winner":
        return Style(float(rng.uniform(1.25, 1.35)), tuple(float(x) for x in rng.uniform(-0.05, 0.05, 2)),
                     float(rng.uniform(YAW - 5, YAW + 5)), float(rng.uniform(0.9, 1.0)))
    if kind == "jitter":
        return Style(float(rng.uniform(0.9, 1.1)), tuple(float(x) for x in rng.uniform(-0.08, 0.08, 2)),
                     float(rng.uniform(YAW - 10, YAW + 10)), 1.0)
    raise ValueError(f"kind must be 'broad', 'winner' or 'jitter', got {kind!r}")


def to_model_space(images):
    """[0, 1] images -> the diffusion model's [-1, 1] (numpy or torch)."""
    return images * 2 - 1


def from_model_space(x):
    """The model's [-1, 1] -> [0, 1] images, clipped (numpy or torch)."""
    y = (x + 1) / 2
    return y.clip(0, 1) if isinstance(y, np.ndarray) else y.clamp(0, 1)


__all__ = ["AZIMUTHS", "BACKGROUND", "CANONICAL", "COLOURS", "ELEVATION", "ObjectSpec", "PREFERRED", "Render", "SHAPES",
           "SINGLE_VIEW_AZIMUTH", "Style", "YAW", "all_objects", "caption", "from_model_space", "object_index",
           "random_style", "render", "render_batch", "templates", "to_model_space"]
