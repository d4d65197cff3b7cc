"""The --smoke modes of adpo, dapo_step, entropy_tokens and sdpo_srpo (issue 17: every reproduction prints a
three-valued verdict line): one subprocess runs the four scripts as ``__main__`` (one torch import for all), each
prints ``<name> (smoke): claim <verdict>: ...`` and none writes its report."""

from __future__ import annotations

import re

from repro_smoke import run_smokes

NAMES = ("adpo", "dapo_step", "entropy_tokens", "sdpo_srpo")


def test_smoke_modes_print_three_valued_verdicts_and_write_no_report(tmp_path):
    out = run_smokes(NAMES, tmp_path, timeout=300)
    for name in NAMES:
        assert any(re.match(rf"^{name} \(smoke\): claim (reproduced|not reproduced|inconclusive): ", line)
                   for line in out[name]), (name, out[name])
