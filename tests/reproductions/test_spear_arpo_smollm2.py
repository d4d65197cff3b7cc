"""reproductions/spear_arpo.py --smollm2: ``--smoke`` as a real subprocess (the 7 stages' commands are built, the ARPO
arm's methods parse to ARPO + EpisodeStats, one verdict line, the report untouched), and the pre-registered rule on
hand-made numbers (paired differences in points, t-interval over 3 seeds: t_0.975,2 = 4.303)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_prints_one_verdict_line_and_leaves_the_report(tmp_path):
    report = ROOT / "reproductions/reports/spear_arpo.md"
    before = report.read_text()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "reproductions/spear_arpo.py"), "--smollm2", "--smoke"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and re.match(r"^spear_arpo-smollm2: claim inconclusive: smoke: 7 stages; rule check on made-up "
                                        r"numbers: reproduced \(\+10\.0 \[\+10\.0, \+10\.0\]\)$", lines[0]), proc.stdout
    assert report.read_text() == before


def test_preregistered_rule_on_hand_made_numbers():
    sys.path.insert(0, str(ROOT / "reproductions"))
    try:
        import spear_arpo as repro
    finally:
        sys.path.remove(str(ROOT / "reproductions"))
    # differences +4, +6, +8 points: mean 6, sd 2, half-width 4.303 * 2 / sqrt(3) = 4.969 -> [1.03, 10.97]: reproduced
    v, d = repro.smol_rule([0.14, 0.16, 0.18], [0.10, 0.10, 0.10], [0.2, 0.1, 0.3])
    assert v == "reproduced" and abs(d[0] - 6) < 1e-9 and abs(d[1] - (6 - 4.303 * 2 / 3 ** 0.5)) < 1e-2
    # differences 0, +2, +4: mean 2, upper 2 + 4.969 = 6.97 >= 5 and mean > 0 -> inconclusive
    assert repro.smol_rule([0.10, 0.12, 0.14], [0.10, 0.10, 0.10], [0.1, 0.1, 0.1])[0] == "inconclusive"
    # differences -1, 0, +1: mean 0 -> not reproduced
    assert repro.smol_rule([0.09, 0.10, 0.11], [0.10, 0.10, 0.10], [0.1, 0.1, 0.1])[0] == "not reproduced"
    # the control never succeeds in training: the buffer never fills -> inconclusive whatever the difference
    assert repro.smol_rule([0.5, 0.6, 0.7], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0])[0] == "inconclusive"
    cmds = repro.smol_commands()
    assert list(cmds) == ["start", "grpo_s0", "arpo_s0", "grpo_s1", "arpo_s1", "grpo_s2", "arpo_s2"]
    assert [a for a in cmds["grpo_s1"] if a != "--seed_everything" and a != "1"] == \
           [a for a in cmds["arpo_s1"] if a not in ("--model.init_args.methods", repro.ARPO_METHODS)
            and a != "--seed_everything" and a != "1"]
