"""A text method in the retrieval domain from YAML: Skywork R1V2's Selective Sample Buffer
(configs/retrieval/ssb.yaml) runs 2 steps of F-GRPO from `advlab fit` on a tiny policy, and its buffer holds
retrieval rows with their declared phase_starts."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model.init_args.policy", "common.models.TinyLlama", "--model.init_args.sampling.max_new_tokens", "8",
        "--model.init_args.group_size", "4", "--data.init_args.first_stage", "latent",
        "--data.init_args.train_size", "8", "--data.init_args.val_size", "4", "--trainer.max_steps", "2",
        "--trainer.logger", "false"]
# The tiny random policy never writes the slate format, so the task rewards are all the format penalty (A = 0):
# two dense length rewards (one per phase) give the buffer informative rows to keep.
LENGTH = ["--model.init_args.rewards",
          '[{"class_path": "common.rewards.length.LengthReward", "init_args": {"target": 12}}, '
          '{"class_path": "common.rewards.length.LengthReward", "init_args": {"target": 4}}]']


@pytest.mark.slow
def test_selective_sample_buffer_runs_in_the_retrieval_domain(tmp_path):
    cmd = [sys.executable, "-m", "common.cli", "fit", "--config", str(ROOT / "configs/retrieval/ssb.yaml"), *TINY, *LENGTH,
           "--model.init_args.selector.min_nonzero", "64"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = tmp_path.rglob("last.ckpt")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    state = ckpt["state_dict"]
    assert int(state["selector.step"]) == 2
    rows = state["selector._extra_state"]["rows"]
    assert len(rows["completions"]) > 0 and bool((rows["advantages"] != 0).any(1).all())  # informative rows only
    assert rows["phase_starts"].shape == (len(rows["completions"]), 2)  # the retrieval field travels with the rows
    assert all("relevance" in s for s in rows["samples"])  # retrieval pools, not text problems
