"""reproductions/mvc_zigal.py and reproductions/seppo.py ``--smoke`` in one real subprocess (runpy, so torch, diffusers
and MiniLM are imported once): an untrained tiny base per script (cached by its config like any base), 2 seeds,
the matched control (MV-PG; SFT) and the method through the library's loop; each prints exactly one verdict line
with one of the three verdicts and the paired interval of its headline difference, and leaves its committed report
untouched."""

from __future__ import annotations

import re

from repro_smoke import run_smokes

SCRIPTS = {
    "mvc_zigal": r"R_mv MV-ZigAL − MV-PG [+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\] over 2 seeds; C0 base ZMV",
    "seppo": r"h SePPO − SFT [+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\] over 2 seeds; S2 SePPO w/o AAF − SFT",
}


def test_smoke_prints_one_verdict_line_each(tmp_path):
    out = run_smokes(list(SCRIPTS), tmp_path)
    for name, pattern in SCRIPTS.items():
        lines = out[name]
        assert len(lines) == 1, lines
        assert re.match(rf"^{name}: claim (reproduced|not reproduced|inconclusive): ", lines[0]), lines[0]
        assert re.search(pattern, lines[0]), lines[0]
