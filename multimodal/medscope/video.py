"""Synthetic long clinical "videos" of shared/methods/domains.md §5 (e), and the temporal-grounding arithmetic.

MedScope (arXiv 2602.13332; repo SII-WenjieLisjtu/MedScope): a video LMM looks at a coarse, sparse sampling of a
long procedure, calls tools to crop a time window or fetch frames near a timestamp, and answers; GA-GRPO rewards
the temporal grounding of its tool windows against the annotated evidence window ``[s*, e*]``.

A video here is ``NUM_FRAMES = 128`` frames, each a ``FEATURE_DIM = 12`` feature vector (a toy "frame embedding"),
a pure function of its seed (:func:`make_video`):

    dims 0-5   instrument colour channels: one-hot of the answer colour (6 colours) inside the event window
               [s*, e*] (4-8 frames), 0 elsewhere, + noise
    dim 6      the procedure "phase": a low-amplitude (0.3) triangular ramp over [s* − 16, e* + 16], visible in the
               coarse view (coarse localisation is possible, the colour is not)
    dim 7      the frame's timestamp t / 127
    dims 8-11  slow background sinusoids with random phases (distractors)

The coarse view (:func:`coarse_view`) is 16 uniformly spaced frames with the colour channels averaged out. Time is
in frame units (1 frame = 1 s); the tool arithmetic (:func:`crop_frames`, :func:`nearest_frames`) and :func:`tiou`
work on it. Frames are also rendered as small RGB images (:func:`render_sheet`: up to 16 frames tiled as a 4×4 sheet,
each tile a grey phase background with the instrument colour in its centre), which the VLM reads.

tIoU of windows ``[s, e]`` and ``[s*, e*]`` (closed intervals in seconds; shared/methods/domains.md §5 (b)):

    tIoU = max(0, min(e, e*) − max(s, s*)) / (max(e, e*) − min(s, s*))

and a window of width 0 (a ``get_frame(t)`` timestamp) counts 1 if ``s* <= t <= e*``, else 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NUM_FRAMES = 128
FEATURE_DIM = 12
NUM_COLOURS = 6
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")
PALETTE = ((230, 40, 40), (40, 200, 60), (40, 70, 230), (230, 220, 40), (160, 50, 200), (40, 210, 220))
PHASE_DIM, TIME_DIM = 6, 7
COARSE_FRAMES = 16
CROP_FRAMES = 8  # crop_video returns this many uniformly spaced frames of the window
NEAREST_FRAMES = 3  # get_frame returns the frames t-1, t, t+1
RAMP_MARGIN = 16
RAMP_AMPLITUDE = 0.3
NOISE = 0.05


def make_video(seed: int) -> dict:
    """The video of ``seed``: {"features": (128, 12) float32, "start", "end" (inclusive frames of the event),
    "colour" (index), "answer" (name)}. A pure function of the seed."""
    g = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    length = int(torch.randint(4, 9, (), generator=g))  # 4-8 frames
    start = int(torch.randint(8, NUM_FRAMES - 8 - length + 1, (), generator=g))
    end = start + length - 1
    colour = int(torch.randint(0, NUM_COLOURS, (), generator=g))
    t = torch.arange(NUM_FRAMES, dtype=torch.float32)  # (N,)
    feats = NOISE * torch.randn(NUM_FRAMES, FEATURE_DIM, generator=g)  # (N, D)
    inside = (t >= start) & (t <= end)
    feats[inside, colour] += 1.0
    centre, half = (start + end) / 2, (end - start) / 2 + RAMP_MARGIN
    feats[:, PHASE_DIM] += RAMP_AMPLITUDE * (1 - (t - centre).abs() / half).clamp(min=0)
    feats[:, TIME_DIM] = t / (NUM_FRAMES - 1)
    phases = 2 * math.pi * torch.rand(4, generator=g)  # (4,)
    freqs = torch.tensor([1.0, 2.0, 3.0, 5.0]) * 2 * math.pi / NUM_FRAMES
    feats[:, 8:12] += 0.2 * torch.sin(t[:, None] * freqs[None] + phases[None])
    return {"features": feats, "start": start, "end": end, "colour": colour, "answer": COLOURS[colour]}


def coarse_frames() -> Tensor:
    """The frame indices of the coarse view: 16 uniformly spaced (4, 12, ..., 124). -> (16,) long."""
    step = NUM_FRAMES // COARSE_FRAMES
    return torch.arange(COARSE_FRAMES) * step + step // 2


def coarse_view(features: Tensor) -> Tensor:
    """The coarse view of a video's features (..., 128, 12) -> (..., 16, 12): the coarse frames with the colour
    channels replaced by their mean (the phase is visible, the answer is not)."""
    out = features[..., coarse_frames(), :].clone()
    out[..., :NUM_COLOURS] = out[..., :NUM_COLOURS].mean(-1, keepdim=True)
    return out


def crop_frames(start: float, end: float, count: int = CROP_FRAMES) -> list[int]:
    """``crop_video(start, end)``: ``count`` uniformly spaced frame indices of the window (clamped to the video;
    ``start > end`` is swapped by the caller, not here). Duplicates are kept (a window shorter than ``count``
    frames gives repeated frames: the context cost is the same)."""
    s, e = max(0.0, min(float(start), NUM_FRAMES - 1)), max(0.0, min(float(end), NUM_FRAMES - 1))
    return [int(round(s + (e - s) * i / (count - 1))) for i in range(count)]


def nearest_frames(t: float) -> list[int]:
    """``get_frame(t)``: the three frames nearest t (t−1, t, t+1, clamped to the video)."""
    c = int(round(max(0.0, min(float(t), NUM_FRAMES - 1))))
    return [min(max(c + d, 0), NUM_FRAMES - 1) for d in (-1, 0, 1)]


def tiou(start: Tensor, end: Tensor, gt_start: Tensor, gt_end: Tensor) -> Tensor:
    """Temporal IoU of windows ``[start, end]`` with ``[gt_start, gt_end]`` (module docstring), elementwise over
    broadcastable float tensors; a window of width 0 is a timestamp (1 inside the ground truth, else 0); a
    reversed window counts as its swap. Never NaN."""
    s, e = torch.minimum(start, end), torch.maximum(start, end)
    inter = (torch.minimum(e, gt_end) - torch.maximum(s, gt_start)).clamp(min=0)
    union = torch.maximum(e, gt_end) - torch.minimum(s, gt_start)
    point = (e - s) == 0
    inside = ((s >= gt_start) & (s <= gt_end)).to(inter.dtype)
    iou = inter / union.clamp(min=1e-12)
    return torch.where(point, inside, torch.where(union > 0, iou, torch.ones_like(iou)))


def best_tiou(windows: list[tuple[float, float]], gt: tuple[float, float]) -> float:
    """max over the windows of tIoU with the ground truth; 0 without a window (host-side, one episode)."""
    if not windows:
        return 0.0
    w = torch.tensor(windows, dtype=torch.float64)  # (K, 2)
    return float(tiou(w[:, 0], w[:, 1], torch.tensor(float(gt[0]), dtype=torch.float64),
                      torch.tensor(float(gt[1]), dtype=torch.float64)).max())


def render_sheet(features: Tensor, frames: list[int] | Tensor, size: int = 32, grid: int = 4) -> Tensor:
    """Frames of a video tiled as an image: uint8 (3, size, size), up to grid² frames in row-major tiles; each
    tile's background is the phase level (grey), its centre square the instrument colour scaled by the colour
    channels (so the coarse view's averaged channels render as a colourless centre). Empty tiles are black."""
    if size % grid:
        raise ValueError(f"size ({size}) must be a multiple of grid ({grid})")
    frames = torch.as_tensor(frames, dtype=torch.long)[: grid * grid]
    tile = size // grid
    img = torch.zeros(3, size, size)
    palette = torch.tensor(PALETTE, dtype=torch.float32) / 255  # (C, 3)
    for k, f in enumerate(frames.tolist()):  # ok: at most 16 tiles of one image
        y, x = (k // grid) * tile, (k % grid) * tile
        v = features[f]
        grey = float((v[PHASE_DIM] / RAMP_AMPLITUDE).clamp(0, 1)) * 0.6 + 0.2
        img[:, y:y + tile, x:x + tile] = grey
        c0, c1 = y + tile // 4, y + tile - tile // 4
        d0, d1 = x + tile // 4, x + tile - tile // 4
        colour = (v[:NUM_COLOURS].clamp(0, 1)[:, None] * palette).sum(0).clamp(0, 1)  # (3,)
        img[:, c0:c1, d0:d1] = colour[:, None, None]
    return (img * 255).round().to(torch.uint8)


__all__ = ["COLOURS", "NUM_FRAMES", "FEATURE_DIM", "NUM_COLOURS", "make_video", "coarse_view", "coarse_frames",
           "crop_frames", "nearest_frames", "tiou", "best_tiou", "render_sheet"]
