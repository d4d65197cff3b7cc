"""`reproductions/roma.py --smollm2 --smoke` as a subprocess: a tiny VLM pre-trained for two steps in a temporary
directory goes through all three arms (GRPO, naive augmentation, ROMA) for one RL step each and the evaluation on
clean and corrupted images; nothing is written under reproductions/reports/."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import private_cache
from resume import ROOT


@pytest.mark.slow  # ~10 s of CPU: two tiny pre-training steps, three one-step RL runs, 27 greedy evaluations
def test_smollm2_path_smoke_runs_every_arm(tmp_path):
    reports = ROOT / "reproductions/reports"
    before = {p.name: p.stat().st_mtime for p in reports.glob("roma_smollm2*")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADVLAB_CACHE": private_cache(tmp_path), "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "reproductions/roma.py"), "--smollm2", "--smoke"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for arm in ("grpo", "naive", "roma"):
        assert f"seed 0 {arm}: clean" in proc.stdout, proc.stdout[-2000:]
    assert proc.stdout.rstrip().splitlines()[-1].startswith("roma_smollm2 (smoke, tiny VLM): claim")
    assert {p.name: p.stat().st_mtime for p in reports.glob("roma_smollm2*")} == before
