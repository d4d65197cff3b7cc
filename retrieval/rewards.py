"""Output format, parser and rewards of generate-and-rank (F-GRPO, arXiv 2605.12995).

The policy answers ``<slate> i_1 ... i_n </slate> <rank> j_1 ... j_k </rank>`` over the candidate ids of the
prompt's pool (1..N). Two rewards, one per phase:

    R_gen  = |slate ∩ Rel| / |Rel|                                    coverage (recall), order-invariant
    R_rank = NDCG@k(σ) = DCG@k / IDCG@k,  DCG@k = Σ_{p<k} rel(σ_p) / log2(p + 2)     position-aware utility

with graded relevance ``rel`` (linear gain, as torchmetrics' RetrievalNormalizedDCG and sklearn's
``ndcg_score``). Malformed output -- a missing or repeated tag, a non-id token, a duplicate, an id outside the
pool, a ranked id outside the slate, an empty slate, a slate longer than ``max_slate`` or a ranking longer than
``rank_k`` -- sets both rewards to the format penalty. Model output is untrusted: parsing is a bounded regex and
never evaluates anything.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from common.rewards.base import RewardFunction

SLATE_OPEN, SLATE_CLOSE, RANK_OPEN, RANK_CLOSE = "<slate>", "</slate>", "<rank>", "</rank>"
_MAX_CHARS = 4096  # longer outputs are malformed (a slate of 10 ids and a ranking of 5 fit in ~60 characters)
_ID = re.compile(r"\d{1,4}")  # an item id; bounded, so int() never sees a huge number
_ANSWER = re.compile(r"<slate>(.*?)</slate>\s*<rank>(.*?)</rank>", re.DOTALL)


@dataclass(frozen=True)
class Parsed:
    slate: tuple[int, ...] = ()
    ranking: tuple[int, ...] = ()
    error: str | None = None  # None = well-formed

    @property
    def ok(self) -> bool:
        return self.error is None


def parse(text: str, pool_size: int, max_slate: int = 10, rank_k: int = 5) -> Parsed:
    """Parse ``<slate> ... </slate> <rank> ... </rank>`` over ids 1..pool_size; ``error`` says what is wrong."""
    if len(text) > _MAX_CHARS:
        return Parsed(error=f"output longer than {_MAX_CHARS} characters")
    for tag in (SLATE_OPEN, SLATE_CLOSE, RANK_OPEN, RANK_CLOSE):
        n = text.count(tag)
        if n != 1:
            return Parsed(error=f"{tag} appears {n} times (expected once)")
    m = _ANSWER.search(text)
    if m is None:
        return Parsed(error="tags out of order (expected <slate> ... </slate> <rank> ... </rank>)")
    lists = []
    for name, body in (("slate", m.group(1)), ("rank", m.group(2))):
        tokens = body.replace(",", " ").split()
        bad = [t for t in tokens if not _ID.fullmatch(t)]
        if bad:
            return Parsed(error=f"{name} holds a non-id token {bad[0][:20]!r}")
        ids = [int(t) for t in tokens]
        if len(set(ids)) != len(ids):
            return Parsed(error=f"{name} repeats an id")
        outside = [i for i in ids if not 1 <= i <= pool_size]
        if outside:
            return Parsed(error=f"{name} id {outside[0]} is outside the pool 1..{pool_size}")
        lists.append(ids)
    slate, ranking = lists
    if not slate:
        return Parsed(error="empty slate")
    if len(slate) > max_slate:
        return Parsed(error=f"slate has {len(slate)} ids (at most {max_slate})")
    if len(ranking) > rank_k:
        return Parsed(error=f"ranking has {len(ranking)} ids (at most {rank_k})")
    extra = [j for j in ranking if j not in set(slate)]
    if extra:
        return Parsed(error=f"ranked id {extra[0]} is not in the slate")
    return Parsed(slate=tuple(slate), ranking=tuple(ranking))


def slate_end(text: str) -> int | None:
    """Character index just after ``</slate>`` (where the ranking phase starts), or None."""
    i = text.find(SLATE_CLOSE)
    return None if i < 0 else i + len(SLATE_CLOSE)


def coverage(slate: Sequence[int], relevance: Sequence[float]) -> float:
    """Recall of the relevant set in the slate: |slate ∩ Rel| / |Rel|; ``relevance[i-1]`` is the grade of id i."""
    relevant = {i + 1 for i, g in enumerate(relevance) if g > 0}
    return len(relevant.intersection(slate)) / len(relevant) if relevant else 0.0


def ndcg_at_k(ranking: Sequence[int], relevance: Sequence[float], k: int) -> float:
    """NDCG@k with linear gain: Σ_{p<k} rel(σ_p)/log2(p+2) over the same for the ideal order (0 if nothing is relevant)."""
    dcg = sum(relevance[j - 1] / math.log2(p + 2) for p, j in enumerate(ranking[:k]))
    ideal = sorted(relevance, reverse=True)[:k]
    idcg = sum(g / math.log2(p + 2) for p, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


class _PhaseReward(RewardFunction):
    def __init__(self, format_penalty: float = -1.0):
        self.format_penalty = format_penalty

    def parsed(self, completion: str, sample: Mapping[str, Any]) -> Parsed:
        return parse(completion, len(sample["relevance"]), sample.get("max_slate", 10), sample.get("rank_k", 5))

    def value(self, p: Parsed, sample: Mapping[str, Any]) -> float:
        raise NotImplementedError

    def __call__(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> Tensor:
        out = []
        for c, s in zip(completions, samples):  # ok: host-side parsing of text, one completion at a time
            p = self.parsed(c, s)
            out.append(self.value(p, s) if p.ok else self.format_penalty)
        return torch.tensor(out, dtype=torch.float32)


class SlateCoverage(_PhaseReward):
    """R_gen: recall of the relevant items in the slate; malformed output gets ``format_penalty``.

    Args:
        format_penalty: reward of malformed output (the paper's value is not public; −1 is below every valid reward).
    """

    name = "coverage"

    def value(self, p: Parsed, sample: Mapping[str, Any]) -> float:
        return coverage(p.slate, sample["relevance"])


class RankingNDCG(_PhaseReward):
    """R_rank: NDCG@k of the ranking against the graded relevance of the whole pool.

    Args:
        k: cut-off (default 5, the paper's ranked output length).
        format_penalty: reward of malformed output.
    """

    name = "ndcg"

    def __init__(self, k: int = 5, format_penalty: float = -1.0):
        if k < 1:
            raise ValueError(f"k must be a positive integer, got {k}")
        super().__init__(format_penalty)
        self.k = k

    def value(self, p: Parsed, sample: Mapping[str, Any]) -> float:
        return ndcg_at_k(p.ranking, sample["relevance"], self.k)


def format_answer(slate: Sequence[int], ranking: Sequence[int]) -> str:
    """The canonical answer text (used for SFT targets and tests)."""
    return f"{SLATE_OPEN} {' '.join(map(str, slate))} {SLATE_CLOSE} {RANK_OPEN} {' '.join(map(str, ranking))} {RANK_CLOSE}"
