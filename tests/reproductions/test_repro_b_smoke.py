"""The ``--smoke`` mode of the reproductions whose verdicts issue 17 turned into outcome experiments (HölderPO, HAPO,
ADORA, T-PPO, SPO single-stream, SSB, D³S, DRPO): each prints exactly one verdict line, with one of the three
verdicts and the paired interval of its outcome, and leaves its committed report untouched.

One real subprocess runs all eight scripts (each as ``__main__`` with ``--smoke``, through ``runpy``) so that torch and
the library are imported once; the parametrised tests then check each script's line."""

from __future__ import annotations

import re

import pytest
from repro_smoke import run_smokes

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


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict[str, list[str]]:
    return run_smokes(list(SCRIPTS), tmp_path_factory.mktemp("smoke"))


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_smoke_prints_one_verdict_line(smoke, name):
    lines = smoke[name]
    assert len(lines) == 1, lines
    assert re.match(rf"^{name}: claim (reproduced|not reproduced|inconclusive): ", lines[0]), lines[0]
    assert re.search(SCRIPTS[name], lines[0]), lines[0]
