"""configs/multimodal/roma.yaml from ``advlab fit`` (the tiny VLM, 2 steps): ROMA's terms are logged and its step
counter (which enters every corruption key) is in the checkpoint; a bad ROMA argument fails in one line naming it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch
from resume import ROOT, cli, events
from startup import advlab_failure

RECIPE = "configs/multimodal/roma.yaml"
TINY = ["--model.init_args.policy.class_path", "multimodal.vlm.model.TinyVLM", "--data.init_args.image_size", "16",
        "--data.init_args.train_size", "8", "--data.init_args.val_size", "4", "--trainer.enable_progress_bar", "false",
        "--model.init_args.sampling.max_new_tokens", "3", "--data.init_args.prompts_per_step", "2",
        "--model.init_args.group_size", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def test_recipe_runs_two_steps_and_checkpoints_the_corruption_step(tmp_path):
    proc = subprocess.run(cli(RECIPE, *TINY, "--trainer.max_steps", "2"), cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = tmp_path / "runs/lightning_logs/version_0"
    for tag in ("train/roma/kl", "train/roma/kl_all", "train/roma/aux_loss", "train/roma/gated_frac", "train/loss"):
        values = events(logs, tag)
        assert sorted(values) == [0, 1] and all(v == v for v in values.values()), tag
    assert all(v > 0 for v in events(logs, "train/roma/kl_all").values())  # the views change the log-probs
    ckpt = torch.load(logs / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert int(ckpt["state_dict"]["methods.0.step"]) == 2


def test_a_bad_roma_argument_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / RECIPE).read_text().replace("num_views: 3 ", "num_views: 0 "))
    proc, seconds = advlab_failure("fit", "--config", str(bad), *TINY, cwd=tmp_path, env=ENV)
    lines = [ln for ln in proc.stderr.splitlines() if "num_views" in ln]
    assert lines and "num_views must be >= 1, got 0" in lines[0], proc.stderr[-2000:]
    assert not (Path(tmp_path) / "runs/lightning_logs/version_0/checkpoints").exists()
