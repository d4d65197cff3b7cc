"""``--smoke`` of seven reproductions (dapo, dump, adhint, mc_grpo, segment_po, ngrpo, r3), run for real in one
subprocess (one interpreter start for all seven: torch and the loop are imported once, which keeps the whole file
within a few seconds of CPU). Each script runs as ``__main__`` with ``--smoke``, exactly as
``python reproductions/<name>.py --smoke`` would, and must print one verdict line — one of the three verdicts — whose
exact-value checks carry the hand-computed numbers, and must leave its committed report untouched."""

from __future__ import annotations

import re

import pytest
from repro_smoke import run_smokes

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


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict[str, list[str]]:
    return run_smokes(NAMES, tmp_path_factory.mktemp("repro_a"))


@pytest.mark.parametrize("name", NAMES)
def test_smoke_prints_one_verdict_line_and_leaves_the_report(smoke, name):
    lines = smoke[name]
    assert len(lines) == 1, lines
    assert re.match(rf"^{name}: claim (reproduced|not reproduced|inconclusive): ", lines[0]), lines[0]
    assert EXPECT[name] in lines[0], lines[0]
    assert not re.search(r"\bnan\b", lines[0], re.I), lines[0]  # degenerate input -> zeros, never NaN
