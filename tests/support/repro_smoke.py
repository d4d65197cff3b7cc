"""The ``--smoke`` modes of reproduction scripts, run in one real subprocess (each script as ``__main__`` through
``runpy``, so torch and the library are imported once): what each script printed, line by line, after checking that
the process succeeded and that no script rewrote its committed report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REPORTS = ROOT / "reproductions/reports"
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


def run_smokes(names: Sequence[str], tmp: Path, *, timeout: int = 600) -> dict[str, list[str]]:
    """Run ``reproductions/<name>.py --smoke`` for every name in one subprocess (working folder ``tmp``, one torch
    thread) and return each script's stdout lines."""
    reports = {n: (REPORTS / f"{n}.md").read_text() for n in names if (REPORTS / f"{n}.md").exists()}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(tmp), "ADVLAB_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(ROOT), *names], cwd=tmp, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (payload,) = [line for line in proc.stdout.splitlines() if line.startswith("SMOKE-JSON")]
    for n, text in reports.items():  # --smoke writes no report
        assert (REPORTS / f"{n}.md").read_text() == text, f"{n} --smoke rewrote its report"
    return {n: out.strip().splitlines() for n, out in json.loads(payload[len("SMOKE-JSON"):]).items()}
