"""Two methods that were module subclasses combine in one recipe: SDPO's EMA self-teacher (SelfDistillation) with
ADHint's hinted rollouts (ADHintRollout), configs/text_reasoning/sdpo_adhint.yaml, 2 steps from ``advlab fit`` on a
tiny real model, with SRPO's routed loss (the recipe's) and with SDPO's plain distillation loss."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from resume import TINY, cli, events

SDPO = {"class_path": "common.losses.self_distill.SDPOLoss", "init_args": {"top_k": 8}}
METHODS = [  # the recipe's two parts; the threshold below every reward makes every row a demonstration
    {"class_path": "text_reasoning.hints.ADHintRollout", "init_args": {"naive_samples": 4}},
    {"class_path": "text_reasoning.self_distill.SelfDistillation", "init_args": {"success_threshold": -100}},
]


@pytest.mark.parametrize("loss", ["srpo", "sdpo"])
def test_sdpo_with_adhint_hints_runs_two_steps(tmp_path, loss):
    # the tiny policy solves nothing: every prompt is hard (Diff = 1), so G − n rows of each group are hinted, and
    # every row has a sibling demonstration, so a teacher to distil
    run = cli("configs/text_reasoning/sdpo_adhint.yaml", *TINY, "--data.init_args.prompts_per_step", "2",
              "--model.init_args.methods", json.dumps(METHODS),
              *(["--model.init_args.loss", json.dumps(SDPO)] if loss == "sdpo" else
                ["--model.init_args.loss.init_args.top_k", "8"]),
              "--trainer.max_steps", "2")
    proc = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = tmp_path / "runs/lightning_logs/version_0"
    for tag in ("train/distill_loss", "train/loss", "train/teacher_entropy"):
        assert sorted(events(logs, tag)) == [0, 1], tag
    distill = events(logs, "train/distill_loss")
    assert all(v > 0 and v == v for v in distill.values()), distill  # a real, finite distillation term each step
    assert min(events(logs, "train/hinted_frac").values()) == 0.5  # G − n = 4 of 8 rows of every group hinted
    assert min(events(logs, "train/hint_len").values()) > 0
    if loss == "srpo":
        assert min(events(logs, "train/sdpo_frac").values()) == 1  # nothing correct: every token is distilled
    ckpt = torch.load(logs / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    state = ckpt["state_dict"]
    teacher = {k[len("methods.1.teacher."):]: v for k, v in state.items() if k.startswith("methods.1.teacher.")}
    policy = {k[len("policy.model."):]: v for k, v in state.items() if k.startswith("policy.model.")}
    assert teacher and teacher.keys() == policy.keys()
    assert any(not torch.equal(teacher[k], policy[k]) for k in teacher)  # θ̄ lags θ by the EMA
