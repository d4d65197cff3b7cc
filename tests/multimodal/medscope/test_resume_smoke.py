"""Kill-and-resume exact (a real SIGKILLed subprocess) for the resumable GA-GRPO trainer, and the reproduction's
``--smoke`` mode as a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
ARGS = ["--steps", "3", "--prompts", "2", "--group-size", "4", "--d", "32", "--layers", "1", "--train-size", "8",
        "--lr", "1e-3", "--advantage", "ga"]


def train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "multimodal.medscope.train", "--out", str(out), *ARGS, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_ga_grpo_training_resumes_exactly_after_sigkill(tmp_path):
    from multimodal.medscope.train import main

    threads = torch.get_num_threads()
    try:
        main(["--out", str(tmp_path / "straight"), *ARGS])  # in-process: the uninterrupted run
    finally:
        torch.set_num_threads(threads)
    killed = train(tmp_path / "killed", "--kill-after", "1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "step 1:" in killed.stdout and "step 2:" not in killed.stdout
    resumed = train(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "step 3:" in resumed.stdout
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 3
    for k, v in a["net"].items():
        assert torch.equal(v, b["net"][k]), k
    for k, st in a["optimizer"]["state"].items():
        for name, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][k][name]), (k, name)
    assert torch.equal(a["generator"], b["generator"]) and torch.equal(a["torch_rng"], b["torch_rng"])


def test_reproduction_smoke_runs():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "reproductions/medscope.py", "--smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "seed 0 nogr:" in out.stdout and "seed 0 ga:" in out.stdout and "medscope: claim" in out.stdout

