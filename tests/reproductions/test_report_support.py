"""reproductions/support/report.py: the interval and verdict helpers every reproduction shares, checked by hand."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "reproductions"))
from support.report import diff_ci, eval_record, fmt_ci, mean_ci, preregistration, split_hash, t975, verdict  # noqa: E402


def test_mean_ci_by_hand():
    # values 1, 2, 3: mean 2, sd 1, half = 4.303 * 1 / sqrt(3) = 2.48434
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0
    assert hi - m == pytest.approx(4.303 / 3 ** 0.5, abs=1e-12)
    assert m - lo == pytest.approx(4.303 / 3 ** 0.5, abs=1e-12)


def test_diff_ci_is_paired():
    # a - b = (1, 1, 1): zero spread, so the interval is the point, though each arm varies a lot
    assert diff_ci([1.0, 5.0, 9.0], [0.0, 4.0, 8.0]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="same seeds"):
        diff_ci([1.0, 2.0], [1.0])


def test_bad_input_names_argument():
    with pytest.raises(ValueError, match="at least 2"):
        mean_ci([1.0])
    with pytest.raises(ValueError, match="df"):
        t975(0)
    with pytest.raises(ValueError, match="verdict must be one of"):
        verdict("x", "maybe", "", echo=False)
    with pytest.raises(ValueError, match="not_reproduced_if"):
        preregistration(claim="c", control="k", not_reproduced_if=" ", seeds=[0, 1, 2])


def test_t_quantiles_and_text():
    assert t975(2) == 4.303 and t975(30) == 2.042 and t975(100) == 1.960
    assert verdict("m", "inconclusive", "d", echo=False) == "m: claim inconclusive: d"
    assert verdict("m", False, "d", echo=False) == "m: claim not reproduced: d"
    assert fmt_ci((0.1, -0.2, 0.4), digits=2, signed=True) == "+0.10 [-0.20, +0.40]"
    pre = preregistration(claim="c", control="k", not_reproduced_if="n", seeds=[0, 1, 2])
    assert "**Not reproduced if:** n" in pre and "0, 1, 2" in pre
    rec = eval_record(task="t", prompt_template="p", answer_extraction="a", eos_rule="e", sampling="greedy",
                      split="s", seeds=[0], device="cpu", max_new_tokens=8)
    assert "| max new tokens | 8 |" in rec and "| device | cpu |" in rec


def test_split_hash_depends_on_content_and_order():
    assert split_hash([{"q": 1}, {"q": 2}]) == split_hash([{"q": 1}, {"q": 2}])
    assert split_hash([{"q": 1}, {"q": 2}]) != split_hash([{"q": 2}, {"q": 1}])
    assert len(split_hash([])) == 12
