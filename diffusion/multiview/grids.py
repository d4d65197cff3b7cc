"""Image grids of the views: a tensor grid (rows = samples, columns = views), PNG files, and a Lightning callback that
writes a grid of fixed prompts and fixed noise to TensorBoard (and PNG) every N training steps.

The callback samples its own small batch (``policy.rollout`` on the first ``rows`` validation captions, one sample
each) under a forked RNG seeded by ``seed``: the training RNG stream is untouched (a resumed run samples exactly as
an uninterrupted one) and every grid uses the same prompts and noise, so grids at different steps show what the
training changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from diffusion.multiview.methods import batch_images


def view_grid(images: Tensor, pad: int = 1, pad_value: float = 1.0) -> Tensor:
    """(B, Nv, 3, H, W) in [0, 1] -> (3, B·(H+pad)+pad, Nv·(W+pad)+pad): row b holds sample b's views left to right."""
    if images.dim() != 5 or images.shape[2] != 3:
        raise ValueError(f"images must be (B, Nv, 3, H, W), got {tuple(images.shape)}")
    B, Nv, _, H, W = images.shape
    grid = torch.full((3, B * (H + pad) + pad, Nv * (W + pad) + pad), pad_value, dtype=torch.float32)
    cells = grid[:, pad:, pad:].unfold(1, H + pad, H + pad).unfold(2, W + pad, W + pad)  # (3, B, Nv, H+pad, W+pad)
    cells[..., :H, :W] = images.detach().float().cpu().clamp(0, 1).permute(2, 0, 1, 3, 4)
    return grid


def save_grid_png(images: Tensor, path: str | Path, scale: int = 4, pad: int = 1) -> Path:
    """Write :func:`view_grid` of (B, Nv, 3, H, W) images in [0, 1] as a PNG, each pixel ``scale`` x ``scale``."""
    from PIL import Image

    g = (view_grid(images, pad).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # (H', W', 3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(g).resize((g.shape[1] * scale, g.shape[0] * scale), Image.NEAREST).save(path)
    return path


class ViewGridCallback(L.Callback):
    """Every ``every_n_steps`` training steps (and before the first), sample one image set for each of ``rows`` fixed
    prompts and log their view grid to TensorBoard (tag ``views``) and, with ``png``, to
    ``<log_dir>/views/step_<n>.png``.

    Args:
        every_n_steps: steps between grids (0 = never).
        rows: prompts in the grid (the data module's first validation records, else its first training records).
        views: Nv of the policy's images.
        seed: the grid's noise seed (the same at every grid).
        png: also write PNG files beside the logs.
    """

    def __init__(self, every_n_steps: int = 50, rows: int = 4, views: int = 4, seed: int = 0, png: bool = True):
        if every_n_steps < 0 or rows < 1:
            raise ValueError(f"every_n_steps must be >= 0 and rows >= 1, got {every_n_steps}, {rows}")
        self.every_n_steps, self.rows, self.views, self.seed, self.png = every_n_steps, rows, views, seed, png
        self._last = -1

    def prompts(self, trainer: L.Trainer) -> list[Any]:
        data = trainer.datamodule
        pool = (getattr(data, "val_set", None) or getattr(data, "train_set", None) or []) if data is not None else []
        if not pool:
            raise ValueError("ViewGridCallback: the data module has no val_set or train_set records to draw prompts from")
        return list(pool[: self.rows])

    @torch.no_grad()
    def grid_images(self, policy: Any, prompts: list[Any]) -> Tensor:
        """(rows, Nv, 3, H, W) in [0, 1]: one sample per prompt, from the fixed seed."""
        devices = [policy.device] if getattr(policy, "device", torch.device("cpu")).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            batch = policy.rollout(prompts, 1)
        return batch_images(batch, self.views)

    def log_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self._last == step or not self.every_n_steps or step % self.every_n_steps:
            return
        self._last = step
        images = self.grid_images(pl_module.policy, self.prompts(trainer))
        logger = trainer.logger
        if logger is not None and hasattr(getattr(logger, "experiment", None), "add_image"):
            logger.experiment.add_image("views", view_grid(images), step)
        if self.png and logger is not None and logger.log_dir:
            save_grid_png(images, Path(logger.log_dir) / "views" / f"step_{step:06d}.png")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.log_grid(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.is_global_zero:
            self.log_grid(trainer, pl_module)


__all__ = ["ViewGridCallback", "save_grid_png", "view_grid"]
