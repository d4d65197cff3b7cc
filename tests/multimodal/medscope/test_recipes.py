"""The MedScope recipes run through ``advlab fit`` (real subprocesses) with tiny-model overrides: the SFT warm start
on generated tool-use trajectories (2 steps, model written), then GA-GRPO from that model (2 steps, the recipe's own
PretrainedVLM path), and the GRPO recipe is the GA recipe with plain GRPO advantages; the MedScope metrics are logged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from helpers import private_cache
from resume import events

ROOT = Path(__file__).resolve().parents[3]
RL_TINY = ["--model.init_args.environment.init_args.image_size", "16", "--model.init_args.environment.init_args.image_tokens", "4",
           "--data.init_args.train_size", "8", "--data.init_args.val_size", "4", "--data.init_args.val_batch_size", "4",
           "--data.init_args.prompts_per_step", "2", "--model.init_args.group_size", "2",
           "--model.init_args.sampling.max_new_tokens", "16", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"]


def advlab(tmp_path: Path, config: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ADVLAB_CACHE": private_cache(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "common.cli", "fit", "--config", str(ROOT / config), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def logged(tmp_path: Path, tag: str) -> dict:
    run = sorted((tmp_path / "runs").rglob("events.out.tfevents*"))[-1].parent
    return events(run, tag)


def test_sft_then_ga_grpo_two_steps_each_and_grpo_differs_only_in_the_advantage(tmp_path):
    sft = tmp_path / "sft"
    sft.mkdir()
    advlab(sft, "configs/multimodal/medscope_sft.yaml",
           "--model.init_args.policy.init_args.source.class_path", "multimodal.vlm.model.TinyVLM",
           "--data.init_args.sources", "[{class_path: multimodal.medscope.vlm_agent.MedScopeTrajectories, "
                                       "init_args: {image_size: 16, image_tokens: 4}}]",
           "--data.init_args.train_size", "8", "--data.init_args.batch_size", "2", "--trainer.max_steps", "2",
           "--trainer.enable_progress_bar", "false", "--model.init_args.output_dir", str(tmp_path / "warm"))
    assert (tmp_path / "warm" / "model.safetensors").exists() and len(logged(sft, "train/loss")) == 2
    ga = tmp_path / "ga"
    ga.mkdir()
    advlab(ga, "configs/multimodal/ga_grpo.yaml", "--model.init_args.policy.init_args.path", str(tmp_path / "warm"), *RL_TINY)
    for tag in ("train/miou", "train/r_at_0.5", "train/tool_calls", "train/frames_read", "train/answer_accuracy"):
        assert sorted(logged(ga, tag)) == [0, 1], tag
    # medscope_grpo.yaml is ga_grpo.yaml with plain GRPO advantages (and the TinyVLM path above is the same policy
    # class): the two recipes differ in model.init_args.advantage only, so the GA run covers the GRPO recipe's parts
    grpo, ga_cfg = (yaml.safe_load((ROOT / f"configs/multimodal/{n}.yaml").read_text()) for n in ("medscope_grpo", "ga_grpo"))
    assert grpo["model"]["init_args"].pop("advantage")["class_path"] == "common.advantages.group.GRPO"
    assert ga_cfg["model"]["init_args"].pop("advantage")["class_path"] == "multimodal.medscope.advantage.GAGRPO"
    assert grpo == ga_cfg
