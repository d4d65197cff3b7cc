"""reproductions/igpo.py --smoke as a real subprocess: one seed, arms no_hint and igpo, a tiny model trained by
masked-diffusion SFT then RL on the shared loop. The report's tables have their columns and one row per arm, every
arm generated exactly the budget's samples (the rescues' extra samples counted, the last step trimmed), and the
evaluation record is there."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
BUDGET = 48  # the smoke budget (reproductions/igpo.py: --smoke)


def table_rows(markdown: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """The header and body rows of the markdown table whose first header cell is ``first_header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    assert set(lines[start + 1].replace("|", "").replace("-", "")) <= {" ", ""}, lines[start + 1]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return header, rows


def test_smoke_reproduction_report_and_equal_samples(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "reproductions/igpo.py"), "--smoke", "--out", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^igpo: claim (reproduced|not reproduced|inconclusive): ", proc.stdout, re.M), proc.stdout[-2000:]

    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert sorted(results) == ["igpo/0", "no_hint/0"]
    for r in results.values():
        assert r["samples"] == BUDGET  # exactly, not "about"
        spans = r["step_samples"]  # (start, end) sample counts of every step, contiguous from 0 to the budget
        assert spans[0][0] == 0 and spans[-1][1] == BUDGET and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert len(r["all_wrong"]) == r["steps"] == len(spans) and all(0 <= x <= 1 for x in r["all_wrong"])
        assert 0 <= r["accuracy"] <= 1 and r["curve"][0][0] == 0 and r["curve"][-1][0] == BUDGET
    assert results["no_hint/0"]["steps"] == BUDGET // 16  # 4 prompts x G = 4 a step, no rescue
    assert results["no_hint/0"]["rescued"] == 0

    report = (tmp_path / "igpo.md").read_text()
    header, rows = table_rows(report, "arm")
    assert header[:4] == ["arm", "what", "seeds", "samples"] and "own all-wrong rate, late (mean [95% t])" in header
    assert [r[0] for r in rows] == ["no_hint", "igpo"] and {r[3] for r in rows} == {str(BUDGET)}
    header, rows = table_rows(report, "comparison (paired by seed)")
    assert [r[0] for r in rows] == ["igpo - no_hint", "all-wrong igpo / no_hint"]
    assert [r[-1] for r in rows] == ["**inconclusive**"] * 2  # one seed: at most inconclusive (pre-registered)
    record = results["igpo/0"]["eval_record"]
    assert record["temperature"] == 0.0 and record["gen_length"] == 12 and len(record["split_hash"]) == 16
    for key in ("prompt_template", "eos_rule", "gen_length", "steps", "block_length", "split_hash"):
        assert f"- {key}: " in report
