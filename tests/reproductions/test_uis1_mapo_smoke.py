"""reproductions/uis1_mapo.py --smoke as a real subprocess (2 seeds x 3 updates per arm through the library's Loop):
it exits 0, prints one verdict line naming every pre-registered comparison, and writes no report (a smoke run must not
overwrite reports/uis1_mapo.md). The pre-registered sanity checks (spec §9 (e), §10 (e)) are asserted in-process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_prints_the_verdict_line_and_leaves_the_report(tmp_path):
    report = ROOT / "reproductions/reports/uis1_mapo.md"
    before = report.read_bytes() if report.exists() else None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "reproductions/uis1_mapo.py"), "--smoke"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = re.search(r"^uis1_mapo: claim (reproduced|not reproduced): (.*)$", proc.stdout, re.M)
    assert line, proc.stdout[-2000:]
    for part in ("UI-S1 − GRPO step accuracy", "ε=2 − ε=0", "MAPO − GRPO normalised value", "MAPO − turn-only",
                 "− batch-only"):
        assert part in line.group(2)
    assert "void" not in line.group(2)  # the sanity checks passed inside the script
    assert (report.read_bytes() if report.exists() else None) == before


def test_sanity_checks_match_the_spec():
    sys.path.insert(0, str(ROOT / "reproductions"))
    try:
        import uis1_mapo
    finally:
        sys.path.remove(str(ROOT / "reproductions"))
    out = uis1_mapo.sanity()
    # closed form Σ_t P(#mismatches in the first t steps ≤ ε), p = 0.6, T = 10; 10k MC rollouts: sd ≤ 0.03
    for mc, exact in zip(out["turns"], (2.49, 4.87, 6.95)):
        assert abs(mc - exact) <= 0.1
    assert out["G"] == [1.5, 1.0, 1.0, 1.0]  # hand computation: 1 + 0.5·1, 1 (cut by the next mismatch), 1, 1
    corr_batch, corr_turn, corr_mixed = out["corr"]
    assert corr_batch < -0.5 and abs(corr_turn) < abs(corr_mixed) < abs(corr_batch)
    assert out["ok"]
