"""Pre-training of the SmolVLM: generated image-question-answer data until it answers clean images well; the
result is cached on disk keyed by its config (``PretrainConfig.directory``).

LLaVA's recipe (Liu et al. 2023, arXiv 2304.08485 §4.1) has two stages, and so has this one:

1. Caption alignment (:func:`align_captions`), the LM out of the loop: the vision tower (from scratch: no vision
   weights are available offline) and the projector learn to emit, at image feature ``i``, the LM's input
   embedding of token ``i`` of the image's caption ("1 red circle, left.", "3 blue shapes.", "3 bars, tallest
   middle."). The first version meant to train the tower as an answer classifier (but the LoRA wrapper, applied
   first, had frozen it: only the linear head learned, a probe of random features at 0.88) and then everything
   through the LM for 150 steps; its projected features had ~5x the embeddings' norm, the LM ignored them and it
   stayed at chance (0.350 on 200 images, chance 0.333). Stage 1 now unfreezes what it trains; aligned to
   embeddings, the features have their norm (4.2 vs 3.2) and carry the words.
2. SFT (:func:`sft`): the answer tokens' negative log-likelihood (answer word + ``<|im_end|>``) through the policy's
   own ``forward`` (the path RL uses: same chat template, same image splicing and placeholder check), LoRA on the
   LM's top ``lora_top_layers`` layers, tower and projector frozen — so the backward pass stops at the lowest
   adapted layer, which keeps it CPU-feasible; it teaches the one-word answer to the question asked.

    python -m multimodal.vlm.pretrain                 # build (or find) the cached model, print held-out accuracy
    python -m multimodal.vlm.pretrain --eval-only     # accuracy of the cached model

Prints ``clean accuracy <acc> on <n> held-out images (<per task>)`` and the cache directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from common.batch import RolloutBatch
from common.data import SEED_STRIDE
from common.rollout.base import Sampling
from multimodal.vlm.data import VQAReward, generate
from multimodal.vlm.model import (LanguageLoRA, config_key, PretrainConfig, PolicySource, SmolVLM, TinyVLM, VisionTower,
                                  pixels_from_uint8)
from multimodal.vlm.policy import VLMPolicy, llava_of

STAGE1_FIELDS = ("vision", "language", "seed", "tower_steps", "tower_batch_size", "tower_lr", "train_size", "tasks")
SYSTEM_PROMPT = "Answer with one word."  # the recipes' system_prompt: the format the model is trained on


def chance_per_task(tasks: Sequence[str]) -> dict[str, float]:
    """Accuracy of a uniform guess over each task's answers (1 / number of answers)."""
    from multimodal.vlm.data import ANSWERS

    return {t: 1.0 / len(ANSWERS[t]) for t in sorted(tasks)}


def chance(tasks: Sequence[str]) -> float:
    """Chance accuracy over equal shares of ``tasks``."""
    per = chance_per_task(tasks)
    return sum(per.values()) / len(per)


def answer_batch(policy: VLMPolicy, samples: Sequence[dict]) -> RolloutBatch:
    """Teacher-forcing batch: prompts (with their images) and completions = answer + EOS (right-padded)."""
    ids, mask = policy.encode(samples)  # (B, P)
    tok = policy.tokenizer
    answers = [tok(s["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for s in samples]
    T = max(map(len, answers))
    comp = torch.full((len(samples), T), tok.pad_token_id, dtype=torch.long)
    cmask = torch.zeros(len(samples), T, dtype=torch.bool)
    for i, a in enumerate(answers):
        comp[i, : len(a)] = torch.tensor(a)
        cmask[i, : len(a)] = True
    pixels = pixels_from_uint8(policy.images_of(samples))  # (B, 3, H, W)
    return RolloutBatch(completion_ids=comp.to(ids.device), completion_mask=cmask.to(ids.device),
                        group_ids=torch.arange(len(samples), device=ids.device), prompt_ids=ids, prompt_mask=mask,
                        inputs={"pixel_values": pixels}, samples=list(samples))


@torch.no_grad()
def accuracy(policy: VLMPolicy, samples: Sequence[dict], batch_size: int = 50) -> tuple[float, dict[str, float]]:
    """Greedy held-out accuracy (VQAReward) overall and per task."""
    reward, hits = VQAReward(), []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        out = policy.rollout(chunk, 1, greedy=True)
        hits += reward(out.completions, chunk).tolist()
    per: dict[str, list[float]] = {}
    for s, h in zip(samples, hits):
        per.setdefault(s["task"], []).append(h)
    return sum(hits) / max(1, len(hits)), {t: sum(v) / len(v) for t, v in sorted(per.items())}


def caption_targets(tokenizer, captions: Sequence[str], slots: int) -> Tensor:
    """Token ids (N, slots): each caption's tokens (no special tokens), then single spaces up to ``slots``; a caption
    longer than ``slots`` tokens keeps its first ``slots`` (only the tests' tiny 4-feature tower is that short)."""
    pad = tokenizer.convert_tokens_to_ids("\u0120")  # "Ġ": one space
    out = torch.full((len(captions), slots), pad, dtype=torch.long)
    for i, c in enumerate(captions):
        ids = tokenizer(c, add_special_tokens=False)["input_ids"]
        out[i, : min(slots, len(ids))] = torch.tensor(ids[:slots])
    return out


def align_captions(llava, tokenizer, cfg: PretrainConfig, train: Sequence[dict], log=print) -> dict:
    """Stage 1: train the (from-scratch) vision tower and the projector so that the projected feature of patch ``i``
    is the LM's input embedding of token ``i`` of the image's caption (:func:`caption_targets`), with the LM frozen
    and out of the loop. The LM then reads an image as it reads its caption: the features have the embeddings'
    norm (the blind first version's projected features had ~5x it and the LM ignored them) and already carry the
    answer words. LLaVA's stage 1 (arXiv 2304.08485 §4.1) aligns the projector to the LM on captions through the
    LM's NLL; regressing the caption's embeddings directly is the CPU-cheap form of it (no LM forward).

    Loss per slot: squared distance to the target embedding / the mean squared embedding norm, plus cross-entropy
    over the captions' token set with logits -||f - e_v||^2 / mean ||e||^2 (the nearest token must be the right
    one). Returns the last 50 steps' slot accuracy (nearest token) and caption exact match."""
    tower, proj = llava.model.vision_tower, llava.model.multi_modal_projector
    emb = llava.model.get_input_embeddings().weight.detach()  # (V, H)
    slots = cfg.vision.num_image_tokens
    images = torch.stack([s["image"] for s in train])  # (N, 3, S, S) uint8
    targets = caption_targets(tokenizer, [s["caption"] for s in train], slots)  # (N, slots)
    vocab, local = torch.unique(targets, return_inverse=True)  # (K,), (N, slots) index into vocab
    cand = emb[vocab]  # (K, H)
    scale = float(cand.pow(2).sum(-1).mean())  # mean squared embedding norm
    params = list(tower.parameters()) + list(proj.parameters())
    for p in params:  # a LoRA wrapper (peft) froze them
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.tower_lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    slot_hits: list[float] = []
    exact: list[float] = []
    t0 = time.time()
    for step in range(cfg.tower_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.tower_lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / cfg.tower_steps))
        idx = torch.randint(len(train), (cfg.tower_batch_size,), generator=gen)
        feats = llava.model.get_image_features(pixel_values=pixels_from_uint8(images[idx]), return_dict=True)
        f = torch.stack(list(feats.pooler_output))  # (b, slots, H)
        mse = (f - emb[targets[idx]]).pow(2).sum(-1).mean() / scale
        # -||f - e||^2 = 2 f.e - ||f||^2 - ||e||^2, as a matmul (no (b, slots, K, H) tensor)
        logits = (2 * f @ cand.T - f.pow(2).sum(-1, keepdim=True) - cand.pow(2).sum(-1)) / scale  # (b, slots, K)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), local[idx].flatten())
        loss = mse + ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        right = logits.argmax(-1) == local[idx]  # (b, slots)
        slot_hits = (slot_hits + right.float().mean(1).tolist())[-50 * cfg.tower_batch_size :]
        exact = (exact + right.all(1).float().tolist())[-50 * cfg.tower_batch_size :]
        if step % 100 == 0 or step == cfg.tower_steps - 1:
            log(f"align step {step} mse {float(mse):.4f} ce {float(ce):.4f} slot acc {sum(slot_hits) / len(slot_hits):.3f} "
                f"caption exact {sum(exact) / len(exact):.3f} ({time.time() - t0:.0f} s)")
    return {"slot_accuracy": sum(slot_hits) / max(1, len(slot_hits)), "caption_exact": sum(exact) / max(1, len(exact)),
            "seconds": time.time() - t0}


@torch.no_grad()
def feature_norms(llava, samples: Sequence[dict]) -> dict[str, float]:
    """Mean L2 norm of the projected image features and of the LM's input embeddings (they should be alike)."""
    feats = llava.model.get_image_features(pixel_values=pixels_from_uint8(torch.stack([s["image"] for s in samples])),
                                           return_dict=True).pooler_output
    return {"image_feature_norm": float(torch.cat(list(feats), 0).norm(dim=-1).mean()),
            "text_embedding_norm": float(llava.model.get_input_embeddings().weight.norm(dim=-1).mean())}


def sft(policy: VLMPolicy, cfg: PretrainConfig, log=print, max_seconds: float | None = None,
        train: Sequence[dict] | None = None) -> int:
    """``cfg.steps`` AdamW steps of answer NLL on generated training data (seed ``cfg.seed``), cosine schedule;
    stops early after ``max_seconds`` of wall time (a shared machine's guard). Returns the steps taken."""
    train = train if train is not None else generate(cfg.train_size, cfg.seed, cfg.tasks, cfg.vision.image_size)
    llava = llava_of(policy.model)
    for p in llava.model.vision_tower.parameters():  # aligned in stage 1, frozen here
        p.requires_grad_(False)
    projector = list(llava.model.multi_modal_projector.parameters()) if cfg.lr_vision > 0 else []
    for p in projector:  # peft froze it
        p.requires_grad_(True)
    old = [p for n, p in llava.named_parameters() if n.startswith("model.language_model") and (cfg.lora_rank == 0
                                                                                           or "lora_" in n)]
    new = projector
    groups = [{"params": old, "lr": cfg.lr_language}] + ([{"params": projector, "lr": cfg.lr_vision}] if projector else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    base = [g["lr"] for g in opt.param_groups]
    warmup = max(1, cfg.steps // 20)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    for step in range(cfg.steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * scale
        idx = torch.randint(len(train), (cfg.batch_size,), generator=gen).tolist()
        batch = answer_batch(policy, [train[i] for i in idx])
        lp = policy(batch).logprobs  # (B, T), 0 off the mask
        loss = -lp.sum() / batch.completion_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(new + old, 1.0)
        opt.step()
        if step % 10 == 0 or step == cfg.steps - 1:
            log(f"step {step} loss {float(loss):.4f} ({time.time() - t0:.0f} s)")
        if max_seconds is not None and time.time() - t0 > max_seconds:
            log(f"stopped after {step + 1} of {cfg.steps} steps: --max-minutes reached")
            return step + 1
    return cfg.steps


def build(cfg: PretrainConfig, source: PolicySource | None = None, out: Path | None = None, val_size: int = 200,
          log=print, max_seconds: float | None = None) -> tuple[Path, dict]:
    """Train (unless ``out`` already holds the result) and evaluate; returns the directory and its report."""
    out = Path(out) if out is not None else cfg.directory
    if (out / "pretrain.json").is_file():
        return out, json.loads((out / "pretrain.json").read_text())
    torch.manual_seed(cfg.seed)
    lora = (LanguageLoRA(rank=cfg.lora_rank, alpha=2.0 * cfg.lora_rank, target_modules=list(cfg.lora_modules),
                         top_layers=cfg.lora_top_layers) if cfg.lora_rank > 0 else None)
    policy = VLMPolicy(source if source is not None else SmolVLM(cfg.vision, seed=cfg.seed), Sampling(max_new_tokens=6),
                       lora=lora, system_prompt=SYSTEM_PROMPT, share_prompt=False)
    train = generate(cfg.train_size, cfg.seed, cfg.tasks, cfg.vision.image_size)
    llava = llava_of(policy.model)
    key = config_key({k: v for k, v in cfg.as_dict().items() if k in STAGE1_FIELDS})
    stage1 = out.parent / f".stage1-{key}.pt"  # the aligned tower + projector: a change of stage 2 reuses stage 1
    if stage1.is_file():
        saved = torch.load(stage1, map_location="cpu", weights_only=False)
        llava.model.vision_tower.load_state_dict(saved["tower"])
        llava.model.multi_modal_projector.load_state_dict(saved["projector"])
        align = saved["report"]
        log(f"stage 1 read from {stage1}")
    else:
        align = align_captions(llava, policy.tokenizer, cfg, train, log)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"tower": llava.model.vision_tower.state_dict(), "report": align,
                    "projector": llava.model.multi_modal_projector.state_dict()}, stage1)
    val = generate(val_size, cfg.seed + SEED_STRIDE, cfg.tasks, cfg.vision.image_size)
    norms = feature_norms(llava_of(policy.model), val)
    t_sft = time.time()
    steps_done = sft(policy, cfg, log, max_seconds, train)
    sft_seconds = time.time() - t_sft
    if lora is not None:  # merge the adapter: the saved model is a plain Llava
        policy.model = policy.model.merge_and_unload()
        policy.lora = None
    acc, per = accuracy(policy, val)
    report = {"config": cfg.as_dict(), "steps_done": steps_done, "caption_alignment": align, **norms,
              "sft_seconds": sft_seconds, "chance": chance(cfg.tasks), "chance_per_task": chance_per_task(cfg.tasks),
              "clean_accuracy": acc, "per_task": per, "val_size": val_size,
              "val_seed": cfg.seed + SEED_STRIDE, "system_prompt": SYSTEM_PROMPT}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".vlm-"))
    policy.model.save_pretrained(tmp, safe_serialization=True)
    policy.tokenizer.save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(json.dumps(report, indent=1))
    try:
        os.replace(tmp, out)  # atomic: a killed run never leaves half a model
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m multimodal.vlm.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=PretrainConfig.steps, help="SFT steps")
    p.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    p.add_argument("--tower-steps", type=int, default=PretrainConfig.tower_steps,
                   help="stage-1 caption-alignment steps (tower + projector, no LM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-size", type=int, default=200, help="held-out images for the accuracy")
    p.add_argument("--out", default=None, help="directory (default: the cache directory keyed by the config)")
    p.add_argument("--eval-only", action="store_true", help="evaluate the cached model, train nothing")
    p.add_argument("--max-minutes", type=float, default=None, help="stop the SFT early after this long (recorded)")
    p.add_argument("--tiny", action="store_true", help="a tiny VLM from config (tests, smoke runs)")
    a = p.parse_args(argv)
    for name in ("steps", "batch_size", "val_size", "tower_steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(a, name)}")
    cfg = PretrainConfig(steps=a.steps, batch_size=a.batch_size, seed=a.seed, tower_steps=a.tower_steps)
    source = None
    if a.tiny:
        tiny = TinyVLM(seed=a.seed)
        cfg = replace(cfg, vision=tiny.vision, language="tiny")
        source = tiny
    out = Path(a.out).expanduser() if a.out else cfg.directory
    if a.eval_only:
        if not (out / "config.json").is_file():
            p.error(f"--eval-only: no pre-trained VLM at {out}; run without --eval-only first")
        from multimodal.vlm.model import PretrainedVLM

        policy = VLMPolicy(PretrainedVLM(str(out)), Sampling(max_new_tokens=6), system_prompt=SYSTEM_PROMPT)
        acc, per = accuracy(policy, generate(a.val_size, cfg.seed + SEED_STRIDE, cfg.tasks, cfg.vision.image_size))
        report = {"clean_accuracy": acc, "per_task": per, "val_size": a.val_size}
    else:
        out, report = build(cfg, source, out, a.val_size, log=lambda m: print(m, flush=True),
                            max_seconds=None if a.max_minutes is None else 60 * a.max_minutes)
    report.setdefault("chance", chance(cfg.tasks))
    report.setdefault("chance_per_task", chance_per_task(cfg.tasks))
    per = ", ".join(f"{t} {v:.2f} (chance {report['chance_per_task'][t]:.2f})" for t, v in report["per_task"].items())
    steps = f", {report['steps_done']} SFT steps" if "steps_done" in report else ""
    print(f"clean accuracy {report['clean_accuracy']:.3f} (chance {report['chance']:.3f}) on {report['val_size']} "
          f"held-out images ({per}{steps})")
    print(f"pre-trained VLM: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
