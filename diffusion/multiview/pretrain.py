"""Denoising pre-training of the base multiview model on the renders, cached on disk by config hash.

DDPM ε-prediction (Ho et al. 2020, arXiv 2006.11239, eq. 14: ``‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t, c)‖²``, mean over
pixels) with a diffusers ``DDPMScheduler`` (1000 linear-β steps, β 1e-4..0.02, domains.md §2(e)) and 10 % condition
dropout (the null condition of classifier-free guidance, Ho & Salimans 2022, arXiv 2207.12598). Stopped early (a few
CPU minutes) so that few-step sampling is visibly imperfect, which is what the RL methods then improve.

    python -m diffusion.multiview.pretrain                      # the multiview base (4 views, 16x16), cached
    python -m diffusion.multiview.pretrain --views 1 --style broad   # the single-view SePPO base (§3(e))

Recipes and reproductions call :func:`pretrained_base` (``PretrainConfig`` fields as keyword overrides): it loads
``<cache_dir>/multiview/base-<hash>/`` (``model.safetensors`` + ``record.json``: config, losses, CPU seconds) when it
exists and trains and saves it otherwise. The record's ``eval_loss_before`` / ``eval_loss_after`` are the loss on
one fixed set of 256 (image, t, ε) triples (seed 12345) before and after training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from common.models import cache_dir
from diffusion.multiview.data import STYLES, azimuths_for, pretrain_batch
from diffusion.multiview.model import CaptionEncoder, MultiviewUNet, config_hash
from diffusion.multiview.render import all_objects

DATA_VERSION = 1  # bump when the renderer or the data change, so cached weights are retrained


@dataclass
class PretrainConfig:
    """Model and training settings of the base model (every field enters the cache key)."""

    views: int = 4
    size: int = 16
    channels: tuple[int, int] = (32, 64)
    layers_per_block: int = 1
    head_dim: int = 8
    max_tokens: int = 12
    style: str = "canonical"  # the pre-training images: canonical renders, or "jitter" / "broad" styles
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 20
    cond_dropout: float = 0.1
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    seed: int = 0
    data_version: int = field(default=DATA_VERSION)
    prediction_type: str = "epsilon"  # what the UNet predicts: "epsilon" (§2(e)), "sample" (x0) or "v_prediction"

    def __post_init__(self):
        azimuths_for(self.views)
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {self.prediction_type!r}")
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0 or not 0 <= self.cond_dropout < 1:
            raise ValueError(f"steps >= 0, batch_size >= 1, lr > 0 and cond_dropout in [0, 1) expected, got {self}")
        self.channels = tuple(int(c) for c in self.channels)

    def key(self) -> str:
        """The cache key: a hash of every field (``prediction_type`` only when not "epsilon": it was added later,
        and caches made before it stay valid)."""
        d = dataclasses.asdict(self)
        if d["prediction_type"] == "epsilon":
            del d["prediction_type"]
        return config_hash(d)

    def model(self) -> MultiviewUNet:
        return MultiviewUNet(self.views, self.size, self.channels, self.layers_per_block, self.head_dim, self.max_tokens)

    def scheduler(self, kind: str = "ddpm"):
        """The training noise schedule as a diffusers scheduler: "ddpm" (training), "ddim" (for
        ``common.sampling.gaussian_step.DDIMStep``: clip_sample, set_alpha_to_one=False, steps_offset=1, so the
        last step keeps a positive variance) or "lcm" (``LCMStep``)."""
        from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler

        if kind == "ddpm":
            return DDPMScheduler(**self.scheduler_config())
        if kind == "ddim":
            return DDIMScheduler(**self.scheduler_config(), clip_sample=True, set_alpha_to_one=False, steps_offset=1)
        if kind == "lcm":
            return LCMScheduler(**self.scheduler_config(), clip_sample=True, set_alpha_to_one=False)
        raise ValueError(f"kind must be 'ddpm', 'ddim' or 'lcm', got {kind!r}")

    def scheduler_config(self) -> dict:
        return {"num_train_timesteps": self.num_train_timesteps, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "beta_schedule": "linear", "prediction_type": self.prediction_type}


def base_dir(config: PretrainConfig) -> Path:
    return cache_dir() / "multiview" / f"base-{config.key()}"


def caption_table(config: PretrainConfig) -> dict[str, Tensor]:
    """Every object's caption -> its conditioning rows (1 + L, 384)."""
    caps = [o.caption for o in all_objects()]
    return dict(zip(caps, CaptionEncoder.shared(config.max_tokens)(caps)))


def denoising_loss(model: MultiviewUNet, alphas_cumprod: Tensor, x0: Tensor, cond: Tensor, t: Tensor, eps: Tensor,
                   prediction_type: str = "epsilon") -> Tensor:
    """Mean ‖target − f_θ(x_t, t, c)‖² with x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε; target ε ("epsilon"), x0 ("sample") or
    v = √ᾱ_t ε − √(1−ᾱ_t) x0 ("v_prediction", Salimans & Ho 2022, arXiv 2202.00512).
    x0, eps (B, C, H, W), t (B,) long, cond (B, 1+L, 384)."""
    a = alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    target = {"epsilon": eps, "sample": x0}.get(prediction_type)
    if target is None:
        target = a.sqrt() * eps - (1 - a).sqrt() * x0
    return (model(xt, t, cond) - target).square().mean()


def _fixed_eval(config: PretrainConfig, table: dict[str, Tensor], n: int = 256) -> tuple[Tensor, ...]:
    x0, caps = pretrain_batch(0, n, config.views, config.style, seed=12345, size=config.size)
    g = torch.Generator().manual_seed(12345)
    t = torch.randint(config.num_train_timesteps, (n,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    return x0, torch.stack([table[c] for c in caps]), t, eps


@torch.no_grad()
def eval_loss(model: MultiviewUNet, config: PretrainConfig, fixed: tuple[Tensor, ...], chunk: int = 64) -> float:
    alphas = config.scheduler().alphas_cumprod
    x0, cond, t, eps = fixed
    was = model.training
    model.eval()
    tot = sum(denoising_loss(model, alphas, x0[s:s + chunk], cond[s:s + chunk], t[s:s + chunk], eps[s:s + chunk],
                         config.prediction_type).item()
              * len(x0[s:s + chunk]) for s in range(0, len(x0), chunk))  # ok: evaluation, not a loss
    model.train(was)
    return tot / len(x0)


def pretrain(config: PretrainConfig, log_every: int = 50, log=print) -> tuple[MultiviewUNet, dict]:
    """Train the base model from scratch; returns it and its record (losses, CPU seconds)."""
    torch.manual_seed(config.seed)
    model = config.model()
    table = caption_table(config)
    null = torch.zeros_like(next(iter(table.values())))
    alphas = config.scheduler().alphas_cumprod
    fixed = _fixed_eval(config, table)
    before = eval_loss(model, config, fixed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(config.warmup, 1)) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / max(config.steps, 1)))))
    g = torch.Generator().manual_seed(config.seed + 1)
    losses, t0 = [], time.process_time()
    model.train()
    for step in range(config.steps):
        x0, caps = pretrain_batch(step, config.batch_size, config.views, config.style, config.seed, config.size)
        cond = torch.stack([table[c] for c in caps])  # (B, 1+L, 384)
        drop = torch.rand(len(caps), generator=g) < config.cond_dropout
        cond = torch.where(drop[:, None, None], null, cond)
        t = torch.randint(config.num_train_timesteps, (len(caps),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        loss = denoising_loss(model, alphas, x0, cond, t, eps, config.prediction_type)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log is not None and log_every and (step + 1) % log_every == 0:
            log(f"step {step + 1}/{config.steps}  loss {sum(losses[-log_every:]) / log_every:.4f}  "
                f"cpu {time.process_time() - t0:.0f}s")
    after = eval_loss(model, config, fixed)
    record = {"config": dataclasses.asdict(config), "key": config.key(), "eval_loss_before": before,
              "eval_loss_after": after, "train_loss_first50": sum(losses[:50]) / max(len(losses[:50]), 1),
              "train_loss_last50": sum(losses[-50:]) / max(len(losses[-50:]), 1), "cpu_seconds": time.process_time() - t0,
              "torch_threads": torch.get_num_threads(), "scheduler": config.scheduler_config(),
              "parameters": sum(p.numel() for p in model.parameters())}
    return model, json.loads(json.dumps(record))  # as it reads back from record.json


def save_base(model: MultiviewUNet, record: dict, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    (tmp / "record.json").write_text(json.dumps(record, indent=1))
    try:
        os.replace(tmp, folder)  # atomic; a concurrent run that finished first wins
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def load_base(config: PretrainConfig) -> tuple[MultiviewUNet, dict] | None:
    """The cached base model of ``config`` and its record, or None."""
    folder = base_dir(config)
    if not (folder / "model.safetensors").exists():
        return None
    from safetensors.torch import load_file

    model = config.model()
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model, json.loads((folder / "record.json").read_text())


def pretrained_base(config: PretrainConfig | None = None, *, retrain: bool = False, log=print, **overrides) -> MultiviewUNet:
    """The pre-trained base model for ``config`` (default ``PretrainConfig()``, fields overridable by keyword): loaded
    from the cache, or trained (a few CPU minutes at the defaults) and cached. ``model.record`` holds its record."""
    config = dataclasses.replace(config or PretrainConfig(), **overrides)
    got = None if retrain else load_base(config)
    if got is None:
        got = pretrain(config, log=log)
        save_base(*got, base_dir(config))
    model, record = got
    model.record = record
    return model


@torch.no_grad()
def sample_base(model: MultiviewUNet, config: PretrainConfig, prompts: list[dict], num_steps: int = 4,
                guidance: float = 1.0, seed: int = 0) -> Tensor:
    """One sample per prompt from ``model`` with the DDIM η = 1 sampler policy (``common.policies.diffusion``),
    fixed noise: (P, Nv, 3, H, W) in [0, 1]."""
    from common.policies.diffusion import ClassifierFreeGuidance, DiffusionSamplerPolicy
    from common.sampling.gaussian_step import DDIMStep
    from diffusion.multiview.methods import batch_images

    policy = DiffusionSamplerPolicy(model, DDIMStep(config.scheduler("ddim"), num_steps, 1.0),
                                    CaptionEncoder.shared(config.max_tokens), (3 * config.views, config.size, config.size),
                                    guidance=None if guidance == 1 else ClassifierFreeGuidance(guidance),
                                    condition_kwarg="cond")
    cond = policy.encode([p["prompt"] for p in prompts])
    seeds = torch.arange(len(prompts), dtype=torch.long) + seed * 1_000_003
    return batch_images(policy.sample_batch(cond, seeds), config.views)


def evaluate_base(model: MultiviewUNet, config: PretrainConfig, num_steps: int = 4, guidance: float = 1.0,
                  n: int = 64, seed: int = 0) -> tuple[dict[str, float], Tensor]:
    """Mean rewards of ``n`` samples (the 120 objects' captions cycled, fixed noise): per-view alignment, joint
    consistency (multiview), attribute accuracy, preference IoU (single view) and the tripwires; and the images."""
    from diffusion.multiview import rewards as R
    from diffusion.multiview.data import object_sample

    objs = all_objects()
    prompts = [object_sample(objs[(7 * i) % len(objs)], config.views) for i in range(n)]
    images = sample_base(model, config, prompts, num_steps, guidance, seed)
    rows = R.object_rows(prompts)
    az = azimuths_for(config.views)
    out = {"alignment": R.view_fidelity(images, rows, az).mean().item(),
           "attribute_accuracy": R.attribute_accuracy(images, rows, az).mean().item(),
           "hf_energy": R.high_frequency_energy(images).mean().item()}
    if config.views > 1:
        out["consistency"] = R.joint_consistency(images, az).mean().item()
    else:
        out["preference_iou"] = R.preference_iou(images, rows, az).mean().item()
    return out, images


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m diffusion.multiview.pretrain", description=__doc__.split("\n\n")[0])
    defaults = PretrainConfig()
    p.add_argument("--views", type=int, default=defaults.views, choices=(1, 4))
    p.add_argument("--style", default=defaults.style, choices=STYLES)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--size", type=int, default=defaults.size)
    p.add_argument("--channels", type=int, nargs=2, default=list(defaults.channels))
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--prediction-type", default=defaults.prediction_type, choices=("epsilon", "sample", "v_prediction"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--retrain", action="store_true", help="train even if the cache has these weights")
    p.add_argument("--eval-steps", type=int, nargs="*", default=[], help="DDIM step counts to evaluate samples at")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale of the evaluation")
    p.add_argument("--png", default=None, help="write a grid of 8 evaluation samples per step count here (a prefix)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    config = PretrainConfig(views=a.views, style=a.style, steps=a.steps, batch_size=a.batch_size, lr=a.lr, size=a.size,
                            channels=tuple(a.channels), seed=a.seed,
                            prediction_type=a.prediction_type)
    model = pretrained_base(config, retrain=a.retrain)
    r = model.record
    print(f"base model {r['key']} ({r['parameters']} parameters): eval loss {r['eval_loss_before']:.4f} -> "
          f"{r['eval_loss_after']:.4f}, train loss first/last 50 steps {r['train_loss_first50']:.4f} / "
          f"{r['train_loss_last50']:.4f}, {r['cpu_seconds']:.0f} CPU s; {base_dir(config)}")
    model.eval()
    for k in a.eval_steps:
        scores, images = evaluate_base(model, config, k, a.guidance)
        print(f"DDIM-{k} (eta 1, guidance {a.guidance:g}), 64 samples: " + ", ".join(f"{n} {v:.3f}" for n, v in scores.items()))
        if a.png:
            from diffusion.multiview.grids import save_grid_png

            print("  grid:", save_grid_png(images[:8], f"{a.png}_ddim{k}.png"))


if __name__ == "__main__":
    main()
