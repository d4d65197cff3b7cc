"""Loop parts that connect the diffusion sampler's images to the multiview rewards and log the tripwires.

The reward protocol (``common/rewards/base.py``) hands reward functions ``(completions, samples)``; the diffusion
policy (``common/policies/diffusion.py``) leaves its decoded images in ``batch.inputs["images"]`` (B, Nv·3, H, W) in
the model's [-1, 1] and no text. :func:`attach_images` (and the :class:`ImagesForRewards` method that calls it after
every training rollout) puts each row's views into its sample record (``samples[i]["images"]``, a (Nv, 3, H, W) view
of the batch's tensor, no copy) and writes a one-line text "completion" per row (the attributes an exact detector
reads from each view, e.g. ``"red cube | red cube | red cube | red cylinder"``), so the rewards score the images and
the completions log shows what was drawn. :class:`ImageTripwires` logs the reward-hacking tripwires
(``rewards.tripwires``) of every training batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from common.batch import RolloutBatch
from common.methods.base import Method
from diffusion.multiview.data import azimuths_for
from diffusion.multiview.render import COLOURS, SHAPES, from_model_space
from diffusion.multiview.rewards import detect_attributes, tripwires

if TYPE_CHECKING:
    from common.loop import Loop

_COLOUR_NAMES, _SHAPE_NAMES = list(COLOURS), list(SHAPES)


def batch_images(batch: RolloutBatch, views: int, key: str = "images") -> Tensor:
    """The batch's decoded images as (B, Nv, 3, H, W) in [0, 1] (from ``inputs[key]``, (B, Nv·3, H, W) in [-1, 1])."""
    x = batch.inputs.get(key)
    if x is None or x.dim() != 4 or x.shape[1] != 3 * views:
        got = None if x is None else tuple(x.shape)
        raise ValueError(f"batch.inputs[{key!r}] must be (B, {3 * views}, H, W) images ({views} views stacked on "
                         f"channels), got {got}")
    return from_model_space(x.detach().float().unflatten(1, (views, 3)))


def describe(images: Tensor, views: int) -> list[str]:
    """One line per row: the detected body colour and shape of each view. images (B, Nv, 3, H, W) in [0, 1]."""
    colour, shape = detect_attributes(images.cpu(), azimuths_for(views))  # (B, Nv) each
    return [" | ".join(f"{_COLOUR_NAMES[c]} {_SHAPE_NAMES[s]}" for c, s in zip(cr, sr))
            for cr, sr in zip(colour.tolist(), shape.tolist())]  # ok: host-side text for the log


def attach_images(batch: RolloutBatch, views: int = 4, key: str = "images") -> RolloutBatch:
    """Each row's views into its sample record (``samples[i][key]``: (Nv, 3, H, W) in the model's [-1, 1], a view of
    ``inputs[key]``) and a text completion per row describing them (module docstring)."""
    x = batch.inputs.get(key)
    imgs = batch_images(batch, views, key)  # checks the shape
    per_row = x.detach().unflatten(1, (views, 3))  # (B, Nv, 3, H, W), the model's range
    if batch.samples and len(batch.samples) != batch.batch_size:
        raise ValueError(f"batch.samples has {len(batch.samples)} records for {batch.batch_size} rows")
    records = batch.samples or [{} for _ in range(batch.batch_size)]
    samples = [{**s, key: row} for s, row in zip(records, per_row)]  # ok: host-side records, one per row
    return batch.replace(samples=samples, completions=describe(imgs, views))


class ImagesForRewards(Method):
    """After every training rollout, :func:`attach_images` (so image rewards receive the views through ``samples``).

    Args:
        views: Nv (4 multiview, 1 single view).
        key: the ``inputs`` / sample key of the images.
    """

    def __init__(self, views: int = 4, key: str = "images"):
        super().__init__()
        azimuths_for(views)
        self.views, self.key = views, key

    def after_rollout(self, loop: "Loop", batch: RolloutBatch) -> RolloutBatch:
        return attach_images(batch, self.views, self.key)


class ImageTripwires(Method):
    """Reward-hacking tripwires of each training batch, logged as ``train/hf_energy``, ``train/grid_energy``,
    ``train/group_diversity`` (``rewards.high_frequency_energy``, ``grid_energy``, ``group_diversity``)."""

    def __init__(self, views: int = 4, key: str = "images"):
        super().__init__()
        azimuths_for(views)
        self.views, self.key = views, key

    @torch.no_grad()
    def after_update(self, loop: "Loop", batch: RolloutBatch) -> dict[str, Tensor]:
        return tripwires(batch_images(batch, self.views, self.key), batch.group_ids)


__all__ = ["ImageTripwires", "ImagesForRewards", "attach_images", "batch_images", "describe"]
