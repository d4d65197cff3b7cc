"""The ``--smoke`` mode of the reproductions whose verdicts issue 17 turned into outcome experiments (HölderPO, HAPO,
ADORA, T-PPO, SPO single-stream, SSB, D³S, DRPO): each prints exactly one verdict line, with one of the three
verdicts and the paired interval of its outcome, and leaves its committed report untouched.

One real subprocess runs all eight scripts (each as ``__main__`` with ``--smoke``, through ``runpy``) so that torch and
the library are imported once; the parametrised tests then check each script's line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "holder_po": r"final pass@1 HölderPO − GRPO [+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\] over 2 seeds",
    "hapo": r"mean accuracy over the steps HAPO − DAPO [+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\] over 2 seeds",
    "adora": r"mean accuracy over 3 steps ADORA − GRPO [+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\] over 2 seeds",
    "tppo": r"needs long generations on an accelerator \(not run\); component checks pass",
    "spo_stream": r"final pass@1 SPO − GRPO\(G=8\) [+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\] over 2 seeds",
    "ssb": r"steps to P\(correct\) 0\.9 GRPO − SSB\(reuse\) [+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\] over 2 seeds",
    "d3s": r"final pass@1 D³S − GRPO [+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\] \(Adam\)",
    "drpo": r"accuracy DRPO − GRPO [+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\], length reduction",
}
DRIVER = """
import runpy, sys
sys.path.insert(0, {repro!r})
for name in {names!r}:
    sys.argv = [name + ".py", "--smoke"]
    print("@@" + name, flush=True)
    runpy.run_path({repro!r} + "/" + name + ".py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict[str, list[str]]:
    reports = {n: (ROOT / f"reproductions/reports/{n}.md").read_text() for n in SCRIPTS}
    tmp = tmp_path_factory.mktemp("smoke")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(tmp)}
    code = DRIVER.format(repro=str(ROOT / "reproductions"), names=list(SCRIPTS))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, list[str]] = {}
    current = None
    for line in proc.stdout.splitlines():
        if line.startswith("@@"):
            current = line[2:]
            out[current] = []
        elif current is not None:
            out[current].append(line)
    for n, text in reports.items():  # --smoke writes no report
        assert (ROOT / f"reproductions/reports/{n}.md").read_text() == text, n
    return out


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_smoke_prints_one_verdict_line(smoke, name):
    lines = smoke[name]
    assert len(lines) == 1, lines
    assert re.match(rf"^{name}: claim (reproduced|not reproduced|inconclusive): ", lines[0]), lines[0]
    assert re.search(SCRIPTS[name], lines[0]), lines[0]
