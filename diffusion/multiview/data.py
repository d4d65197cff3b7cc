"""Caption prompts for the shared loop and rendered images for pre-training (domains.md §2(e), §3(e)).

A prompt is a sample dict (the data module's own record, handed to ``policy.rollout`` in a list, as every domain's):
``prompt`` (the caption, "a red cube with a blue stripe"), ``shape``, ``body``, ``accent`` (the ground-truth
attributes the rewards read), ``object`` (its row of ``render.templates``), ``views`` (Nv) and ``task``
("multiview" or "single_view"). The 120 objects are split once by the data seed: ``val_size`` held-out captions
(§2(e) holds out 20) and the rest for training.

Pre-training images (:func:`pretrain_batch`, :class:`RenderDataset`) are a pure function of (seed, index): the object
and its style are drawn from a generator seeded by them, so a batch is reproducible from its number alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from common.data import SEED_STRIDE, ResumableData
from diffusion.multiview.render import (AZIMUTHS, CANONICAL, SINGLE_VIEW_AZIMUTH, ObjectSpec, Style, all_objects,
                                        object_index, random_style, render, templates, to_model_space)

STYLES = ("canonical", "jitter", "broad", "winner")


def azimuths_for(views: int) -> tuple[float, ...]:
    """The camera azimuths of ``views`` = 4 (multiview) or 1 (single view)."""
    if views == 4:
        return AZIMUTHS
    if views == 1:
        return SINGLE_VIEW_AZIMUTH
    raise ValueError(f"views must be 4 (multiview) or 1 (single view), got {views}")


def object_sample(obj: ObjectSpec, views: int = 4) -> dict:
    """The prompt record of one object (module docstring)."""
    return {"prompt": obj.caption, "shape": obj.shape, "body": obj.body, "accent": obj.accent,
            "object": object_index(obj), "views": views, "task": "multiview" if views > 1 else "single_view"}


def split_objects(val_size: int = 20, seed: int = 0) -> tuple[list[ObjectSpec], list[ObjectSpec]]:
    """(train, val) objects: a seeded permutation of the 120, the first ``val_size`` held out."""
    objs = all_objects()
    if not 0 <= val_size < len(objs):
        raise ValueError(f"val_size must be in [0, {len(objs) - 1}], got {val_size}")
    order = torch.randperm(len(objs), generator=torch.Generator().manual_seed(seed + SEED_STRIDE)).tolist()
    return [objs[i] for i in order[val_size:]], [objs[i] for i in order[:val_size]]


class MultiviewPrompts(ResumableData):
    """Caption prompts of the synthetic objects for the loop (training stream + held-out validation captions).

    Args:
        views: 4 (text-to-multiview, MVC-ZigAL / DDPO) or 1 (single view, SePPO).
        val_size: held-out captions (never trained on).
        prompts_per_step, val_batch_size, seed: see ``common.data.ResumableData``.
    """

    def __init__(self, views: int = 4, val_size: int = 20, prompts_per_step: int = 8, val_batch_size: int = 20,
                 seed: int = 0):
        super().__init__(prompts_per_step, val_batch_size, seed)
        azimuths_for(views)
        split_objects(val_size, seed)
        self.views, self.val_size = views, val_size

    def setup(self, stage: str | None = None) -> None:
        if self.train_set:
            return
        train, val = split_objects(self.val_size, self.seed)
        self.train_set = [object_sample(o, self.views) for o in train]
        self.val_set = [object_sample(o, self.views) for o in val]


def sample_objects(samples: Sequence[Mapping[str, Any]]) -> list[ObjectSpec]:
    try:
        return [ObjectSpec(s["shape"], s["body"], s["accent"]) for s in samples]
    except KeyError as e:
        raise ValueError(f"samples must carry the object's 'shape', 'body' and 'accent', missing {e}") from None


def render_samples(samples: Sequence[Mapping[str, Any]], views: int = 4, style: str = "canonical", seed: int = 0,
                   size: int = 16) -> Tensor:
    """Renders of the samples' objects in the model's space: (B, Nv, 3, H, W) in [-1, 1]. ``style``: "canonical", or
    a :func:`render.random_style` kind ("jitter", "broad", "winner") drawn per sample from ``seed`` (e.g. SePPO's
    winning images: ``render_samples(prompts, 1, "winner", seed=step)``)."""
    objs = sample_objects(samples)
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    rng = np.random.default_rng([seed, 17])
    styles = [CANONICAL if style == "canonical" else random_style(rng, style) for _ in objs]
    az = azimuths_for(views)
    if not objs:
        return torch.zeros(0, views, 3, size, size)
    return to_model_space(torch.from_numpy(np.stack([render(o, size, az, s).images for o, s in zip(objs, styles)])))



def pretrain_batch(number: int, batch_size: int, views: int = 4, style: str = "canonical", seed: int = 0,
                   size: int = 16, objects: Sequence[ObjectSpec] | None = None) -> tuple[Tensor, list[str]]:
    """Pre-training batch ``number``: images (batch_size, Nv·3, H, W) in [-1, 1] (views stacked on channels) and
    their captions; objects drawn uniformly (with replacement) from ``objects`` (default all 120), styles as in
    :func:`render_samples`. A pure function of its arguments."""
    objs = list(objects) if objects is not None else all_objects()
    if batch_size < 1 or not objs:
        raise ValueError(f"batch_size must be >= 1 and objects non-empty, got {batch_size}, {len(objs)} objects")
    g = torch.Generator().manual_seed(seed * SEED_STRIDE + number)
    idx = torch.randint(len(objs), (batch_size,), generator=g).tolist()
    chosen = [objs[i] for i in idx]
    if style == "canonical":  # the cached templates
        rows = [object_index(o) for o in chosen]
        imgs = to_model_space(torch.from_numpy(np.array(templates(size, azimuths_for(views))[0][rows])))
    else:
        imgs = render_samples([object_sample(o, views) for o in chosen], views, style, seed * SEED_STRIDE + number, size)
    return imgs.flatten(1, 2), [o.caption for o in chosen]


class RenderDataset(Dataset):
    """A map-style data set of ``length`` rendered images for pre-training: item i is (image (Nv·3, H, W) in [-1, 1],
    caption), object ``i % 120`` of ``objects`` in a style drawn from (seed, i)."""

    def __init__(self, length: int = 1200, views: int = 4, style: str = "canonical", seed: int = 0, size: int = 16,
                 objects: Sequence[ObjectSpec] | None = None):
        self.objects = list(objects) if objects is not None else all_objects()
        self.length, self.views, self.style, self.seed, self.size = length, views, style, seed, size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Tensor, str]:
        obj = self.objects[i % len(self.objects)]
        img = render_samples([object_sample(obj, self.views)], self.views, self.style, self.seed * SEED_STRIDE + i,
                             self.size)[0]
        return img.flatten(0, 1), obj.caption


__all__ = ["MultiviewPrompts", "RenderDataset", "STYLES", "azimuths_for", "object_sample", "pretrain_batch",
           "render_samples", "sample_objects", "split_objects"]
