"""Pre-training of the SmolVLM: supervised fine-tuning on generated image-question-answer data until it answers
clean images well; the result is cached on disk keyed by its config (``PretrainConfig.directory``).

LLaVA's recipe (Liu et al. 2023, arXiv 2304.08485) trains the projector first and then the LM; here the vision
tower is trained from scratch too (no vision weights are available offline), so all three are trained together in
one stage, with a larger learning rate on the new parts (tower + projector) than on SmolLM2's pre-trained weights.
The loss is the answer tokens' negative log-likelihood (answer word + ``<|im_end|>``) computed by the policy's own
``forward`` (the path RL uses: same chat template, same image splicing and placeholder check).

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

from common.batch import RolloutBatch
from common.data import SEED_STRIDE
from common.models import LoRA
from common.rollout.base import Sampling
from multimodal.vlm.data import VQAReward, generate
from multimodal.vlm.model import PretrainConfig, PolicySource, SmolVLM, TinyVLM, VisionTower, pixels_from_uint8
from multimodal.vlm.policy import VLMPolicy, llava_of

SYSTEM_PROMPT = "Answer with one word."  # the recipes' system_prompt: the format the model is trained on


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


def pretrain_tower(llava, cfg: PretrainConfig, train: Sequence[dict], log=print) -> float:
    """Stage 1: train the (from-scratch) vision tower as a classifier of the answers, with a linear head over its
    flattened patch features, one head per task (the question), cross-entropy. No LM in the loop, so thousands of
    images cost minutes; stage 2 then only aligns these features to the LM (LLaVA's stage 1 with a tower
    pre-trained on our own data instead of CLIP's). Returns the last 50 steps' training accuracy."""
    from multimodal.vlm.data import ANSWERS

    tower = llava.model.vision_tower
    n_feat = cfg.vision.num_image_tokens * cfg.vision.hidden_size
    width = max(len(ANSWERS[t]) for t in cfg.tasks)
    head = torch.nn.Linear(n_feat, len(cfg.tasks) * width)
    task_of = {t: i for i, t in enumerate(cfg.tasks)}
    images = torch.stack([s["image"] for s in train])  # (N, 3, H, W) uint8
    tasks = torch.tensor([task_of[s["task"]] for s in train])  # (N,)
    labels = torch.tensor([ANSWERS[s["task"]].index(s["answer"]) for s in train])  # (N,)
    valid = torch.zeros(len(cfg.tasks), width, dtype=torch.bool)  # (K, W) answers each task can have
    for t, i in task_of.items():
        valid[i, : len(ANSWERS[t])] = True
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.tower_lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    hits: list[float] = []
    t0 = time.time()
    for step in range(cfg.tower_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.tower_lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / cfg.tower_steps))
        idx = torch.randint(len(train), (cfg.tower_batch_size,), generator=gen)
        feats = tower(pixels_from_uint8(images[idx]), output_hidden_states=True).hidden_states[-1]  # (b, N, D)
        logits = head(feats.flatten(1)).view(-1, len(cfg.tasks), width)[torch.arange(len(idx)), tasks[idx]]  # (b, W)
        logits = logits.masked_fill(~valid[tasks[idx]], float("-inf"))
        loss = torch.nn.functional.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        hits = (hits + (logits.argmax(-1) == labels[idx]).float().tolist())[-50 * cfg.tower_batch_size :]
        if step % 100 == 0 or step == cfg.tower_steps - 1:
            log(f"tower step {step} loss {float(loss):.4f} train acc {sum(hits) / len(hits):.3f} ({time.time() - t0:.0f} s)")
    return sum(hits) / max(1, len(hits))


def sft(policy: VLMPolicy, cfg: PretrainConfig, log=print, max_seconds: float | None = None,
        train: Sequence[dict] | None = None) -> int:
    """``cfg.steps`` AdamW steps of answer NLL on generated training data (seed ``cfg.seed``), cosine schedule;
    stops early after ``max_seconds`` of wall time (a shared machine's guard). Returns the steps taken."""
    train = train if train is not None else generate(cfg.train_size, cfg.seed, cfg.tasks, cfg.vision.image_size)
    llava = llava_of(policy.model)
    tower = list(llava.model.vision_tower.parameters())
    projector = list(llava.model.multi_modal_projector.parameters())
    for p in tower + projector:  # peft froze them
        p.requires_grad_(True)
    old = [p for n, p in llava.named_parameters() if n.startswith("model.language_model") and (cfg.lora_rank == 0
                                                                                           or "lora_" in n)]
    new = tower + projector
    opt = torch.optim.AdamW([{"params": projector, "lr": cfg.lr_vision}, {"params": tower, "lr": cfg.lr_vision / 10},
                             {"params": old, "lr": cfg.lr_language}], weight_decay=0.0)
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
    lora = LoRA(rank=cfg.lora_rank, alpha=2.0 * cfg.lora_rank) if cfg.lora_rank > 0 else None
    policy = VLMPolicy(source if source is not None else SmolVLM(cfg.vision, seed=cfg.seed), Sampling(max_new_tokens=6),
                       lora=lora, system_prompt=SYSTEM_PROMPT, share_prompt=False)
    train = generate(cfg.train_size, cfg.seed, cfg.tasks, cfg.vision.image_size)
    tower_acc = pretrain_tower(llava_of(policy.model), cfg, train, log)
    steps_done = sft(policy, cfg, log, max_seconds, train)
    if lora is not None:  # merge the adapter: the saved model is a plain Llava
        policy.model = policy.model.merge_and_unload()
        policy.lora = None
    val = generate(val_size, cfg.seed + SEED_STRIDE, cfg.tasks, cfg.vision.image_size)
    acc, per = accuracy(policy, val)
    report = {"config": cfg.as_dict(), "steps_done": steps_done, "tower_train_accuracy": tower_acc,
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
    p.add_argument("--tower-steps", type=int, default=PretrainConfig.tower_steps, help="stage-1 steps (tower only)")
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
    per = ", ".join(f"{t} {v:.2f}" for t, v in report["per_task"].items())
    steps = f", {report['steps_done']} SFT steps" if "steps_done" in report else ""
    print(f"clean accuracy {report['clean_accuracy']:.3f} on {report['val_size']} held-out images ({per}{steps})")
    print(f"pre-trained VLM: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
