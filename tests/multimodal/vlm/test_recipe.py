"""configs/multimodal/grpo_vlm.yaml runs one step through ``advlab fit`` with a tiny VLM (real subprocess); a missing
pre-trained VLM fails in one line naming the path; the pre-training is cached by its config and reloads."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from helpers import private_cache
from startup import advlab_failure

ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(ROOT / "configs/multimodal/grpo_vlm.yaml")
TINY = ["--model.init_args.policy.class_path", "multimodal.vlm.model.TinyVLM", "--data.init_args.image_size", "16",
        "--data.init_args.train_size", "8", "--data.init_args.val_size", "4", "--data.init_args.val_batch_size", "4",
        "--model.init_args.group_size", "2", "--model.init_args.sampling.max_new_tokens", "3"]


def env(tmp_path: Path) -> dict:
    # PYTHONPATH: the repo root, so `multimodal` imports whether or not the editable install predates it
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ADVLAB_CACHE": private_cache(tmp_path / "cache"),
            "VLLM_CPU_KVCACHE_SPACE": "1"}


def test_recipe_runs_one_step(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "common.cli", "fit", "--config", RECIPE, *TINY, "--trainer.max_steps", "1",
                           "--evaluate", "true"], cwd=tmp_path, env=env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out accuracy: before" in proc.stdout + proc.stderr
    assert list((tmp_path / "runs").rglob("*.ckpt"))  # a checkpoint of the one step


def test_missing_pretrained_vlm_is_one_line(tmp_path):
    proc, beyond_import = advlab_failure("fit", "--config", RECIPE, "--trainer.max_steps", "1", cwd=tmp_path,
                                         env=env(tmp_path))
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("advlab")]
    assert lines and "PretrainedVLM: path" in lines[0] and "python -m multimodal.vlm.pretrain" in lines[0], proc.stderr[-2000:]
    assert beyond_import < 10


def test_pretraining_is_cached_by_config_and_reloads(tmp_path, monkeypatch):
    from multimodal.vlm.model import PretrainConfig, PretrainedVLM, TinyVLM
    from multimodal.vlm.pretrain import build

    monkeypatch.setenv("ADVLAB_CACHE", private_cache(tmp_path))
    tiny = TinyVLM(seed=0)
    cfg = PretrainConfig(vision=tiny.vision, language="tiny", steps=2, batch_size=4, train_size=40,
                         tower_steps=3, tower_batch_size=8)
    assert cfg.directory != replace(cfg, steps=3).directory and cfg.directory.parent == tmp_path / "vlm"
    logs: list[str] = []
    out, report = build(cfg, tiny, val_size=5, log=logs.append)
    assert out == cfg.directory and report["steps_done"] == 2 and 0.0 <= report["clean_accuracy"] <= 1.0
    assert set(report["per_task"]) <= {"colour", "shape", "count", "position", "bars"}
    again: list[str] = []
    assert build(cfg, tiny, val_size=5, log=again.append)[1] == report and not again  # cached: nothing trained
    model, tok = PretrainedVLM(str(out)).load()
    assert tok.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert not any("lora" in n for n, _ in model.named_parameters())  # the adapter was merged
    from multimodal.vlm.pretrain import SYSTEM_PROMPT, accuracy
    from multimodal.vlm.policy import VLMPolicy
    from multimodal.vlm.data import generate
    from common.rollout.base import Sampling

    torch.manual_seed(0)
    pol = VLMPolicy(PretrainedVLM(str(out)), Sampling(max_new_tokens=6), system_prompt=SYSTEM_PROMPT)
    acc, _ = accuracy(pol, generate(5, cfg.seed + 1_000_003, cfg.tasks, 16))
    assert acc == report["clean_accuracy"]  # the saved weights answer as the trained ones did
