"""``--smoke`` of seven reproductions (dapo, dump, adhint, mc_grpo, segment_po, ngrpo, r3), run for real in one
subprocess (one interpreter start for all seven: torch and the loop are imported once, which keeps the whole file
within a few seconds of CPU). Each script runs as ``__main__`` with ``--smoke``, exactly as
``python reproductions/<name>.py --smoke`` would, and must print one verdict line — one of the three verdicts — whose
exact-value checks carry the hand-computed numbers, and must leave its committed report untouched."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("dapo", "dump", "adhint", "mc_grpo", "segment_po", "ngrpo", "r3")
# per script: a hand-computed value its smoke line must carry (component checks that hold at any run length)
EXPECT = {
    "dapo": "checks 4/4 pass",  # clip-higher gradient, dynamic sampling, overlong 0/-0.5/-1/-1, token-mean 1/110
    "dump": "2-arm P_0 = 0.965756 (hand 0.965756)",  # 1 / (1 + exp(-(u0 - u1) / 0.1)) with the UCB bonuses
    "adhint": "checks pass",
    "mc_grpo": "rows with A != 0",
    "segment_po": "component checks 4/4",
    "ngrpo": "G=8 one-correct NGRPO +1.764/-0.504, all-wrong -0.333",  # paper's case study; all wrong -1/3
    "r3": "SERR rewards [1.0, 0.3333, 0.0, 0.6667]",  # R_max·(1, 1/3, 0, 2/3) from dominance counts (2, 1, 0, 2)
}
DRIVER = """
import contextlib, io, json, runpy, sys
root = sys.argv[1]
sys.path.insert(0, root + "/reproductions")
out = {}
for name in sys.argv[2:]:
    sys.argv = [f"{root}/reproductions/{name}.py", "--smoke"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        runpy.run_path(sys.argv[0], run_name="__main__")
    out[name] = buf.getvalue()
print("SMOKE-JSON" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repro_a")
    reports = {n: (ROOT / "reproductions/reports" / f"{n}.md").read_text() for n in NAMES}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(tmp), "ADVLAB_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(ROOT), *NAMES], cwd=tmp, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (payload,) = [line for line in proc.stdout.splitlines() if line.startswith("SMOKE-JSON")]
    return json.loads(payload[len("SMOKE-JSON"):]), reports


@pytest.mark.parametrize("name", NAMES)
def test_smoke_prints_one_verdict_line_and_leaves_the_report(smoke, name):
    out, reports = smoke
    lines = out[name].strip().splitlines()
    assert len(lines) == 1, out[name]
    assert re.match(rf"^{name}: claim (reproduced|not reproduced|inconclusive): ", lines[0]), lines[0]
    assert EXPECT[name] in lines[0], lines[0]
    assert not re.search(r"\bnan\b", lines[0], re.I), lines[0]  # degenerate input -> zeros, never NaN
    assert (ROOT / "reproductions/reports" / f"{name}.md").read_text() == reports[name]
