"""Naive augmentation, the baseline ROMA argues against: roll out on corrupted images some of the time.

ROMA's abstract (arXiv 2605.09262): "naively injecting degraded views during rollout induces reward poisoning, where
perceptual occlusions trigger hallucinated trajectories and destabilize optimization". This method replaces the
training rollout: each prompt's image is corrupted with probability ``prob`` (a seen corruption at a random level,
drawn from the key h(seed, sample, step, 0) of ``multimodal.roma.corruptions``), then the policy rolls out as usual on
the prompts as modified. Each row's log-probs are computed under the image that produced it (the policy keeps the
image it generated from in ``batch.inputs``) — the default and the only unbiased choice. ``score_under="clean"``
instead trains the row under the *clean* image (what augmented-rollout pipelines often do by accident); it is a
named option, and the per-row log importance weight log w_i = Σ_t (ℓ_clean − ℓ_corrupt)_{i,t} of that mismatch is
recorded in ``inputs["aug_log_iw"]`` (B,) and logged (``aug/log_iw``, ``aug/ess``: effective sample size share
(Σw)² / (B Σw²)). Each sample records its corruption (``samples[i]["augmentation"]``: ``describe`` or None).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from common.batch import RolloutBatch
from common.methods.base import Method
from common.ops import seeded_uniform
from multimodal.roma import corruptions as C

if TYPE_CHECKING:
    from common.loop import Loop


def _uid(uid: Any) -> int:
    """A prompt's identity as one integer: an int, or a tuple of ints such as (seed, index) folded together."""
    if isinstance(uid, (tuple, list)):
        out = 0
        for x in uid:
            out = (out * 1_000_003 + int(x)) % (1 << 62)
        return out
    return int(uid)


class NaiveAugmentation(Method):
    """Roll out on corrupted images with probability ``prob`` (module docstring).

    Args:
        prob: probability that a prompt's image is corrupted for its rollouts (the spec's arm: 0.5).
        corruptions: names, or ``"seen"``.
        min_level, max_level: severity levels drawn uniformly.
        score_under: ``"rollout"`` (the image that produced the row) or ``"clean"`` (logged importance weight).
        prompt_image_key: the image in a prompt record: float (C, H, W) in [0, 1] or uint8 (C, H, W).
        image_key: the policy's image in ``batch.inputs`` (for ``score_under="clean"``).
        pixel_mean, pixel_std: ``inputs[image_key] = (x − mean) / std`` for x in [0, 1].
        seed: the sampler's seed.
    """

    def __init__(self, prob: float = 0.5, corruptions: Sequence[str] | str = "seen", min_level: int = 1,
                 max_level: int = C.NUM_LEVELS, score_under: Literal["rollout", "clean"] = "rollout",
                 prompt_image_key: str = "image", image_key: str = "pixel_values", pixel_mean: float = 0.0,
                 pixel_std: float = 1.0, seed: int = 0):
        super().__init__()
        if not 0 <= prob <= 1:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        if score_under not in ("rollout", "clean"):
            raise ValueError(f"score_under must be 'rollout' or 'clean', got {score_under!r}")
        if pixel_std <= 0:
            raise ValueError(f"pixel_std must be > 0, got {pixel_std}")
        self.allowed = C.kind_ids(corruptions, "corruptions")
        C.draw_views(torch.zeros(1, dtype=torch.long), self.allowed, min_level, max_level)  # checks the levels
        self.prob, self.min_level, self.max_level, self.score_under = prob, min_level, max_level, score_under
        self.prompt_image_key, self.image_key, self.seed = prompt_image_key, image_key, seed
        self.pixel_mean, self.pixel_std = pixel_mean, pixel_std
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def _image(self, prompt: dict, i: int) -> Tensor:
        im = prompt.get(self.prompt_image_key) if isinstance(prompt, dict) else None
        if not torch.is_tensor(im) or im.dim() != 3:
            raise ValueError(f"prompt {i}: {self.prompt_image_key!r} (prompt_image_key) must be an image tensor (C, H, W), "
                             f"got {type(im).__name__}")
        return im

    def rollout(self, loop: "Loop", prompts: Any, n: int) -> RolloutBatch:
        prompts = list(prompts)
        images = [self._image(p, i) for i, p in enumerate(prompts)]
        uids = torch.tensor([_uid(p.get("uid", i)) for i, p in enumerate(prompts)], dtype=torch.long)  # (P,)
        keys = C.view_keys(self.seed, uids, self.step, 1)[:, 0]  # (P,)
        hit = seeded_uniform(keys, 3, (1,))[:, 0] < self.prob  # (P,)
        kinds, levels = C.draw_views(keys, self.allowed, self.min_level, self.max_level)
        stack = torch.stack(images)  # (P, C, H, W)
        uint8 = stack.dtype == torch.uint8
        pixels = stack.float() / 255 if uint8 else stack.float().clone()  # (P, C, H, W) in [0, 1], a copy
        rows = hit.nonzero().squeeze(1)
        if rows.numel():
            pixels[rows] = C.corrupt(pixels[rows], kinds[rows], levels[rows], keys[rows])
        out = (pixels * 255).round().clamp(0, 255).to(torch.uint8) if uint8 else pixels.to(stack.dtype)
        records = [C.describe(int(k), int(lv), int(key)) if h else None
                   for k, lv, key, h in zip(kinds.tolist(), levels.tolist(), keys.tolist(), hit.tolist())]
        augmented = [{**p, self.prompt_image_key: out[i], "augmentation": records[i]} for i, p in enumerate(prompts)]
        batch = loop.policy.rollout(augmented, n)
        if self.score_under == "clean":
            clean = ((stack.float() / 255 if uint8 else stack.float()) - self.pixel_mean) / self.pixel_std
            clean = clean.repeat_interleave(n, 0).to(batch.inputs[self.image_key])  # (B, C, H, W)
            with torch.no_grad():
                lp_rollout = loop.logprobs(batch)  # (B, T) under the image that produced the row
                batch = batch.replace(inputs={**batch.inputs, self.image_key: clean})
                lp_clean = loop.logprobs(batch)
            log_iw = ((lp_clean - lp_rollout) * batch.completion_mask).sum(1)  # (B,)
            batch = batch.replace(inputs={**batch.inputs, "aug_log_iw": log_iw})
        return batch

    def after_update(self, loop: "Loop", batch: RolloutBatch) -> dict[str, Tensor]:
        self.step += 1
        if "aug_log_iw" not in batch.inputs:
            return {}
        log_w = batch.inputs["aug_log_iw"]
        w = torch.exp(log_w - log_w.max())
        return {"aug/log_iw": log_w.mean(), "aug/ess": w.sum() ** 2 / (w.numel() * (w**2).sum()).clamp(min=1e-30)}


__all__ = ["NaiveAugmentation"]
