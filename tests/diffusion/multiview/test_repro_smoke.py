"""reproductions/mvc_zigal.py and reproductions/seppo.py ``--smoke`` in one real subprocess (runpy, so torch, diffusers
and MiniLM are imported once): an untrained tiny base per script (cached by its config like any base), 2 seeds,
the matched control (MV-PG; SFT) and the method through the library's loop; each prints exactly one verdict line
with one of the three verdicts and the paired interval of its headline difference, and leaves its committed report
untouched."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SCRIPTS = {
    "mvc_zigal": r"R_mv MV-ZigAL − MV-PG [+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\] over 2 seeds; C0 base ZMV",
    "seppo": r"h SePPO − SFT [+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\] over 2 seeds; S2 SePPO w/o AAF − SFT",
}
DRIVER = """
import runpy, sys
sys.path.insert(0, {repro!r})
for name in {names!r}:
    sys.argv = [name + ".py", "--smoke"]
    print("@@" + name, flush=True)
    runpy.run_path({repro!r} + "/" + name + ".py", run_name="__main__")
"""


def test_smoke_prints_one_verdict_line_each(tmp_path):
    reports = {n: (ROOT / f"reproductions/reports/{n}.md").read_text() for n in SCRIPTS}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(tmp_path)}
    code = DRIVER.format(repro=str(ROOT / "reproductions"), names=list(SCRIPTS))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("@@"):
            out[line[2:]] = []
        elif out:
            out[list(out)[-1]].append(line)
    for name, pattern in SCRIPTS.items():
        lines = out[name]
        assert len(lines) == 1, lines
        assert re.match(rf"^{name}: claim (reproduced|not reproduced|inconclusive): ", lines[0]), lines[0]
        assert re.search(pattern, lines[0]), lines[0]
        assert (ROOT / f"reproductions/reports/{name}.md").read_text() == reports[name], name  # --smoke writes none
