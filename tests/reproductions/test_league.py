"""reproductions/league.py ``--smoke`` as a real subprocess: GRPO and RLOO composed from their parts train the
SFT'd tiny Llama for 2 rollout batches each through the shared module, the rollout backend counts exactly
2 x 8 prompts x G 8 = 128 training rollouts per arm (greedy evaluations not counted), and the markdown (table,
evaluation record with the split hash, plot) is written where --out says, the committed table untouched."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_league_smoke_trains_two_arms_and_writes_the_table(tmp_path):
    committed = ROOT / "reproductions/league.md"
    before = committed.read_text() if committed.exists() else None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(tmp_path), "ADVLAB_CACHE": str(tmp_path / "cache")}
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, str(ROOT / "reproductions/league.py"), "--smoke", "--out",
                           str(tmp_path / "league.md"), "--results", str(tmp_path / "r.json")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for arm in ("grpo", "rloo"):
        assert re.search(rf"^{arm} seed 0: acc \d\.\d{{3}} -> \d\.\d{{3}}, credit \d\.\d{{3}}, 128 rollouts, \d+ tokens",
                         proc.stdout, re.M), proc.stdout
    md = (tmp_path / "league.md").read_text()
    assert "SMOKE RUN" in md and "## Evaluation record" in md and "## Not in the league" in md
    assert re.search(r"^\| grpo \| text_reasoning/grpo_arithmetic\.yaml \| \d\.\d{3} \(1 seed\) \|", md, re.M), md
    assert re.search(r"^\| rloo \| inline parts \| \d\.\d{3} \(1 seed\) \|", md, re.M), md
    assert re.search(r"evaluation split \| [0-9a-f]{12} \|", md), md
    assert (tmp_path / "league_smoke.png").stat().st_size > 0
    assert (committed.read_text() if committed.exists() else None) == before
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    assert cpu < 60, f"smoke took {cpu:.1f} s of CPU"
