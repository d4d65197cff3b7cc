"""Generate-and-rank output parser, format penalty, coverage / NDCG rewards (hand-computed) and the
torchmetrics evaluation of generated rankings (against the same hand numbers)."""

import math

import pytest
import torch

from retrieval.metrics import RankingMetrics
from retrieval.rewards import RankingNDCG, SlateCoverage, coverage, format_answer, ndcg_at_k, parse

REL = [0.0] * 20
REL[2], REL[6], REL[11] = 2.0, 1.0, 1.0  # ids 3 (grade 2), 7 and 12 (grade 1)


def test_parse_well_formed():
    p = parse("<slate> 3 7 12 5 </slate> <rank> 7 3 </rank>", 20)
    assert p.ok and p.slate == (3, 7, 12, 5) and p.ranking == (7, 3)
    assert parse(format_answer([1, 2], [2]) + "<|im_end|> trailing", 20).ok  # text after </rank> is ignored
    assert parse("<slate>3,7</slate><rank>7</rank>", 20).slate == (3, 7)  # commas, no spaces


@pytest.mark.parametrize("text, why", [
    ("<slate> 3 7 </slate>", "<rank> appears 0 times"),
    ("3 7 </slate> <rank> 7 </rank>", "<slate> appears 0 times"),
    ("<slate> 3 <slate> 7 </slate> <rank> 7 </rank>", "<slate> appears 2 times"),
    ("<rank> 7 </rank> <slate> 3 7 </slate>", "out of order"),
    ("<slate> 3 3 </slate> <rank> 3 </rank>", "slate repeats"),
    ("<slate> 3 7 </slate> <rank> 7 7 </rank>", "rank repeats"),
    ("<slate> 3 21 </slate> <rank> 3 </rank>", "outside the pool"),
    ("<slate> 0 3 </slate> <rank> 3 </rank>", "outside the pool"),
    ("<slate> 3 7 </slate> <rank> 7 12 </rank>", "12 is not in the slate"),
    ("<slate> </slate> <rank> </rank>", "empty slate"),
    ("<slate> 3 seven </slate> <rank> 3 </rank>", "non-id token"),
    ("<slate> 3 -7 </slate> <rank> 3 </rank>", "non-id token"),
    ("<slate> " + " ".join(map(str, range(1, 12))) + " </slate> <rank> 1 </rank>", "at most 10"),
    ("<slate> 1 2 3 4 5 6 </slate> <rank> 1 2 3 4 5 6 </rank>", "at most 5"),
    ("<slate> " + "9" * 5000 + " </slate> <rank> 1 </rank>", "longer than"),
    ("<slate> 99999 </slate> <rank> </rank>", "non-id token"),
    ("<slate> __import__('os').system('x') </slate> <rank> 1 </rank>", "non-id token"),
    ("[" * 10**6, "longer than"),
])
def test_malformed_outputs_are_named_and_penalised(text, why):
    p = parse(text, 20)
    assert not p.ok and why in p.error
    sample = {"relevance": REL, "max_slate": 10, "rank_k": 5}
    assert SlateCoverage(format_penalty=-1.0)([text], [sample]).tolist() == [-1.0]
    assert RankingNDCG(k=5, format_penalty=-0.5)([text], [sample]).tolist() == [-0.5]


def test_coverage_and_ndcg_hand_computed():
    # relevant {3, 7, 12}; slate {3, 5, 7} covers 2 of 3
    assert coverage([3, 5, 7], REL) == pytest.approx(2 / 3)
    assert coverage([1, 2], [0.0] * 20) == 0.0  # nothing relevant: 0, not NaN
    # ranking (7, 5, 3): DCG@3 = 1/log2(2) + 0 + 2/log2(4) = 1 + 1 = 2
    # ideal (3, 7, 12): IDCG@3 = 2/1 + 1/log2(3) + 1/log2(4) = 2 + 0.63093 + 0.5 = 3.13093
    assert ndcg_at_k([7, 5, 3], REL, 3) == pytest.approx(2 / (2.5 + 1 / math.log2(3)))
    assert ndcg_at_k([3, 7, 12], REL, 3) == pytest.approx(1.0)
    assert ndcg_at_k([7, 3], REL, 1) == pytest.approx(0.5)  # DCG@1 = 1, IDCG@1 = 2
    assert ndcg_at_k([], REL, 5) == 0.0
    sample = {"relevance": REL, "max_slate": 10, "rank_k": 5}
    text = "<slate> 3 5 7 </slate> <rank> 7 5 3 </rank>"
    assert SlateCoverage()([text], [sample]).tolist() == pytest.approx([2 / 3])
    # NDCG@5: IDCG@5 = IDCG@3 (only 3 relevant) -> the same 2 / 3.13093
    assert RankingNDCG(k=5)([text], [sample]).tolist() == pytest.approx([2 / (2.5 + 1 / math.log2(3))])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        RankingNDCG(k=0)


def test_torchmetrics_evaluation_matches_hand_numbers():
    m = RankingMetrics(ndcg_k=(3,), recall_k=(3, 5))
    # query 1: ranking (7, 5, 3) -> NDCG@3 = 2/3.13093 = 0.63878, Recall@3 = 2/3, Recall@5 = 2/3, MRR = 1 (7 is first)
    # query 2: ranking (5,) (a one-item list) -> NDCG@3 = 0, Recall = 0, MRR = 0 (missed items never enter the top 5)
    m.update([[7, 5, 3], [5]], [REL, REL])
    out = m.compute()
    assert out["ndcg@3"].item() == pytest.approx((2 / (2.5 + 1 / math.log2(3))) / 2, abs=1e-6)
    assert out["recall@3"].item() == pytest.approx(1 / 3, abs=1e-6)
    assert out["recall@5"].item() == pytest.approx(1 / 3, abs=1e-6)
    assert out["mrr"].item() == pytest.approx(0.5, abs=1e-6)
    # the reward's NDCG and torchmetrics' agree on a random ranking
    g = torch.Generator().manual_seed(0)
    ranking = (torch.randperm(20, generator=g)[:5] + 1).tolist()
    m.reset()
    m.update([ranking], [REL])
    assert m.compute()["ndcg@3"].item() == pytest.approx(ndcg_at_k(ranking, REL, 3), abs=1e-6)
