"""reproductions/gigpo.py --smollm2: ``--smoke`` as a real subprocess (the SFT records, the held-out split and the
stages' command lines are built, one verdict line, the report untouched), and the grid expert's paths checked by
hand: a shortest path (length = Manhattan distance) of legal moves that ends on the goal."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_prints_one_verdict_line_and_leaves_the_report(tmp_path):
    report = ROOT / "reproductions/reports/gigpo.md"
    before = report.read_text()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "reproductions/gigpo.py"), "--smollm2", "--smoke", "--out",
                           str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and re.match(r"^gigpo-smollm2: claim inconclusive: smoke: \d+ SFT records, 4 held-out tasks "
                                        r"\(split [0-9a-f]{12}\), 4 stages$", lines[0]), proc.stdout
    assert report.read_text() == before
    assert not (tmp_path / "out").exists()  # the smoke writes nothing


def test_expert_paths_are_shortest_and_reach_the_goal():
    sys.path.insert(0, str(ROOT / "reproductions"))
    try:
        import gigpo as repro
    finally:
        sys.path.remove(str(ROOT / "reproductions"))
    rng = random.Random(0)
    step = {"u": (-1, 0), "d": (1, 0), "l": (0, -1), "r": (0, 1)}
    for start, goal in [((0, 0), (3, 3)), ((2, 1), (0, 1)), ((3, 0), (3, 2)), ((1, 3), (2, 0))]:
        path = repro.grid_expert_path(4, start, goal, rng)
        assert len(path) == abs(start[0] - goal[0]) + abs(start[1] - goal[1])
        cell = start
        for at, move in path:
            assert at == cell and 0 <= at[0] < 4 and 0 <= at[1] < 4
            cell = (cell[0] + step[move][0], cell[1] + step[move][1])
        assert cell == goal
    assert [m for _, m in repro.grid_expert_path(4, (0, 0), (0, 2), rng)] == ["r", "r"]
    sft_cmd = repro.smol_commands(repro.smol_settings(True), Path("/x"))["sft"]
    assert sft_cmd[:3] == ["fit", "--config", str(ROOT / "configs/agentic/sft_sokoban.yaml")]
