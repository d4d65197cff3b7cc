"""The multiview diffusion domain module: the shared loop on a ``DiffusionSamplerPolicy`` over the base multiview UNet.

The loop is ``common/loop.py``'s, the policy ``common.policies.diffusion.DiffusionSamplerPolicy`` (actions = the K
denoising transitions, Gaussian step log-probs); this module only

- builds that policy from its arguments: the pre-trained base (``diffusion.multiview.pretrain.pretrained_base``,
  cached by config hash), a DDIM (η > 0) or LCM step builder from the base's noise schedule, the bundled MiniLM
  caption conditioning (the empty prompt -> the all-zero null condition the base was trained with for CFG);
- hands each row's decoded views to the reward functions (``samples[i]["images"]``, (Nv, 3, H, W) in [-1, 1]; the
  row's "completion" text is its caption, which the reward functions do not read);
- scores validation (the mean of every reward on the held-out captions, one fixed noise per caption);
- logs a TensorBoard image grid of the views (rows: samples, columns: views) and the reward-hacking tripwires
  (high-frequency / grid energy, within-group diversity).

Which method trains is YAML: DDPO-style clipped PG is the default loop with ``ClippedPolicyLoss`` (clip 1e-4); MVC-ZigAL
adds ``diffusion.multiview.zigal.ZigzagPairs`` + ``MVCAdvantage`` and the ``ZigALLoss``; SePPO adds
``diffusion.multiview.seppo.SePPO`` and the ``SePPOLoss`` (single-view base, ``base: {views: 1, style: broad}``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from common.batch import RolloutBatch
from common.module import PolicyOptimizationModule
from common.policies.diffusion import ClassifierFreeGuidance, DiffusionSamplerPolicy
from common.sampling.gaussian_step import DDIMStep, LCMStep
from diffusion.multiview.model import TEXT_DIM, CaptionEncoder, unstack_views
from diffusion.multiview.pretrain import PretrainConfig, pretrained_base
from diffusion.multiview.render import from_model_space
from diffusion.multiview.rewards import tripwires


class CaptionConditions:
    """Captions -> the base model's conditioning (P, 1 + L, 384): the shared MiniLM :class:`CaptionEncoder` rows, and
    all zeros for the empty prompt (the null condition of the base's condition dropout, ``MultiviewUNet.null_cond``)."""

    def __init__(self, max_tokens: int = 12):
        self.max_tokens = max_tokens

    def __call__(self, texts: Sequence[str]) -> Tensor:
        texts = list(texts)
        out = torch.zeros(len(texts), 1 + self.max_tokens, TEXT_DIM)
        keep = [i for i, t in enumerate(texts) if t]
        if keep:
            out[keep] = CaptionEncoder.shared(self.max_tokens)([texts[i] for i in keep])
        return out


def build_policy(base: PretrainConfig, sampler: Literal["ddim", "lcm"] = "ddim", num_steps: int = 4, eta: float = 1.0,
                 guidance_scale: float = 4.0, train_unconditional: bool = False, log=None) -> DiffusionSamplerPolicy:
    """The sampler policy over the cached base model of ``base`` (trained and cached on first use)."""
    from diffusers import DDIMScheduler, LCMScheduler

    if sampler not in ("ddim", "lcm"):
        raise ValueError(f"sampler must be 'ddim' or 'lcm', got {sampler!r}")
    unet = pretrained_base(base, log=log)
    cfg = base.scheduler_config()
    if sampler == "ddim":  # the last step keeps a positive σ (DDPO's / SD's setting)
        step = DDIMStep(DDIMScheduler(**cfg, set_alpha_to_one=False, steps_offset=1, clip_sample=True), num_steps, eta)
    else:
        step = LCMStep(LCMScheduler(**cfg, original_inference_steps=min(50, cfg["num_train_timesteps"])), num_steps, eta)
    guidance = None if guidance_scale == 1.0 else ClassifierFreeGuidance(guidance_scale, train_unconditional)
    return DiffusionSamplerPolicy(unet, step, CaptionConditions(base.max_tokens), (3 * base.views, base.size, base.size),
                                  guidance=guidance, condition_kwarg="cond")


class MultiviewDiffusionModule(PolicyOptimizationModule):
    """A diffusion sampler over the synthetic multiview objects, trained by the shared loop (module docstring).

    Args:
        base: ``PretrainConfig`` fields of the base model (default: 4 views, 16x16, 600 pre-training steps).
        sampler: "ddim" (η > 0, DDPO) or "lcm" (MVC-ZigAL's stochastic LCM step).
        num_steps: K, denoising steps per trajectory.
        eta: the sampler's η (1 = DDPO / LCM).
        guidance_scale: classifier-free guidance w (1 = conditional only).
        train_unconditional: back-propagate through CFG's unconditional branch too.
        log_images_every: steps between TensorBoard view grids (0 = never).
        image_rows: samples per grid.
        **kwargs: everything of :class:`common.module.PolicyOptimizationModule` but ``policy``.
    """

    def __init__(self, base: dict[str, Any] | None = None, sampler: Literal["ddim", "lcm"] = "ddim", num_steps: int = 4,
                 eta: float = 1.0, guidance_scale: float = 4.0, train_unconditional: bool = False,
                 log_images_every: int = 25, image_rows: int = 4, **kwargs: Any):
        self.base_config = PretrainConfig(**(base or {}))
        policy = build_policy(self.base_config, sampler, num_steps, eta, guidance_scale, train_unconditional)
        super().__init__(policy, **kwargs)
        self.views = self.base_config.views
        self.log_images_every, self.image_rows = log_images_every, image_rows

    # ------------------------------------------------------------------ step 2: rewards read the decoded views
    def with_images(self, rollouts: RolloutBatch) -> RolloutBatch:
        views = unstack_views(rollouts.inputs["images"].detach().float().cpu(), self.views)  # (B, Nv, 3, H, W)
        samples = [{**s, "images": v} for s, v in zip(rollouts.samples, views)]
        texts = rollouts.completions or [str(s.get(self.policy.prompt_key, "")) for s in samples]  # one per row (B,)
        return rollouts.replace(samples=samples, completions=texts)

    def score(self, rollouts: RolloutBatch) -> RolloutBatch:
        return super().score(self.with_images(rollouts))

    # ------------------------------------------------------------------ validation: mean rewards, fixed noise
    @torch.no_grad()
    def validation_step(self, prompts: Sequence[dict], batch_idx: int) -> None:
        policy = self.policy
        cond = policy.encode(policy.prompt_texts(prompts))
        seeds = torch.arange(len(prompts), device=cond.device) + 1_000_003 * (batch_idx + 1)  # fixed per caption
        scored = self.score(policy.sample_batch(cond, seeds, samples=[dict(p) for p in prompts]))
        for k, name in enumerate(scored.reward_names):
            self.log(f"val/{name}", scored.reward_components[:, k].mean(), on_epoch=True, batch_size=len(prompts))
        self.log("val/reward", scored.rewards.mean(), on_epoch=True, batch_size=len(prompts), prog_bar=True)

    # ------------------------------------------------------------------ step 7: view grids and tripwires
    def log_step(self, rollouts: RolloutBatch, metrics: dict[str, Tensor], **timings: float) -> None:
        super().log_step(rollouts, metrics, **timings)
        images = from_model_space(unstack_views(rollouts.inputs["images"].detach().float().cpu(), self.views))
        self.log_dict({f"train/{k}": v for k, v in tripwires(images, rollouts.group_ids.cpu()).items()},
                      on_step=True, on_epoch=False, batch_size=rollouts.batch_size)
        step = self.global_step
        if self.log_images_every and step % self.log_images_every == 0 and isinstance(self.logger, TensorBoardLogger):
            self.logger.experiment.add_image("views", view_grid(images[: self.image_rows]), step)


def view_grid(images: Tensor) -> Tensor:
    """(R, Nv, 3, H, W) in [0, 1] -> one (3, R·H, Nv·W) image: rows are samples, columns views."""
    R, Nv, C, H, W = images.shape
    return images.permute(2, 0, 3, 1, 4).reshape(C, R * H, Nv * W)


__all__ = ["CaptionConditions", "MultiviewDiffusionModule", "build_policy", "view_grid"]
