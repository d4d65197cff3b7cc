"""The README's speculative benchmark command runs end to end (a real process, the bundled SmolLM2): its smoke
mode generates training responses, trains a draft for a few seconds and decodes held-out prompts. At float32 the
speculative output must equal greedy decoding on every prompt, whatever the draft."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_speculative_benchmark_quick_is_lossless_at_float32(tmp_path):
    env = {**os.environ, "ADVLAB_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run([sys.executable, "benchmarks/speculative.py", "--quick", "--dtype", "float32"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "speculative_float32_quick.md").read_text()
    rows = [line.split("|")[1:-1] for line in report.splitlines() if line.startswith("| top-k")]
    assert len(rows) == 3  # one row per tree
    for row in rows:
        tau, calls_per_token, identical = float(row[1]), float(row[2]), row[6].strip()
        assert tau >= 1.0 and 0 < calls_per_token <= 1.0  # every cycle commits at least the bonus token
        assert re.fullmatch(r"(\d+)/\1", identical), f"float32 speculative output differs from greedy: {row}"
