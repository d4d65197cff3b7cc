"""The --smoke modes of adpo, dapo_step, entropy_tokens and sdpo_srpo (issue 17: every reproduction prints a
three-valued verdict line): one subprocess runs the four scripts as ``__main__`` (one torch import for all), each
prints ``<name> (smoke): claim <verdict>: ...`` and none writes its report."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("adpo", "dapo_step", "entropy_tokens", "sdpo_srpo")
RUN = """
import runpy, sys
sys.path.insert(0, "reproductions")
for name in {names!r}:
    sys.argv = ["reproductions/%s.py" % name, "--smoke"]
    runpy.run_path("reproductions/%s.py" % name, run_name="__main__")
"""


def test_smoke_modes_print_three_valued_verdicts_and_write_no_report():
    reports = {n: (ROOT / "reproductions/reports" / f"{n}.md").stat().st_mtime_ns for n in NAMES}
    done = subprocess.run([sys.executable, "-c", RUN.format(names=NAMES)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    for name in NAMES:
        assert re.search(rf"^{name} \(smoke\): claim (reproduced|not reproduced|inconclusive): ", done.stdout, re.M), \
            (name, done.stdout)
        assert (ROOT / "reproductions/reports" / f"{name}.md").stat().st_mtime_ns == reports[name], f"{name} wrote its report"
