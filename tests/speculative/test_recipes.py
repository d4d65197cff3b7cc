"""Both speculative recipes run from ``advlab`` in a subprocess (shrunk by CLI overrides): Phase I writes the
draft file that Phase II loads as its frozen reference M0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import private_cache

ROOT = Path(__file__).resolve().parents[2]
SHRINK = [
    "--model.init_args.policy.init_args.train_steps", "3",  # a target trained for 3 steps is enough to run
    "--model.init_args.policy.init_args.seq_len", "32",
    "--data.init_args.seq_len", "32",
    "--data.init_args.train_size", "32",
    "--data.init_args.val_size", "2",
    "--data.init_args.batch_size", "4",
    "--trainer.max_steps", "2",
    "--trainer.val_check_interval", "2",
    "--trainer.limit_val_batches", "1",
    "--model.init_args.val_new_tokens", "8",
    "--trainer.logger", "false",
]


def advlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ADVLAB_CACHE": private_cache(cwd / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "common.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_eagle_then_gto_recipes_run_from_advlab(tmp_path):
    advlab("fit", "--config", str(ROOT / "configs/speculative/eagle.yaml"), *SHRINK, cwd=tmp_path)
    m0 = tmp_path / "runs/speculative/eagle_draft.safetensors"
    assert m0.exists()
    advlab("fit", "--config", str(ROOT / "configs/speculative/gto.yaml"), *SHRINK,
           "--model.init_args.groups", "2", "--model.init_args.group_size", "3", cwd=tmp_path)
    assert (tmp_path / "runs/speculative/gto_draft.safetensors").exists()
    assert any(tmp_path.glob("**/last.ckpt"))  # the checkpoint callback saved the GTO run
