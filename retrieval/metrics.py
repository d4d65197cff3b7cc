"""Evaluation of generated rankings with torchmetrics' retrieval metrics (NDCG@k, Recall@k, MRR).

torchmetrics ranks every row of a query by its score; a generated answer is a short list, not a scoring of
the whole pool. :func:`ranked_list_rows` turns one answer into rows whose score order is the answer, followed
by ``k_max`` zero-relevance filler rows, followed by the relevant candidates the answer missed: the top-k
(k <= k_max) then holds exactly the answer's items, and the ideal DCG and the recall denominator still see
every relevant candidate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics.retrieval import RetrievalMRR, RetrievalNormalizedDCG, RetrievalRecall


def ranked_list_rows(ranking: Sequence[int], relevance: Sequence[float], k_max: int) -> tuple[Tensor, Tensor]:
    """Rows (scores, graded targets) of one query. ``ranking`` holds ids 1..N; ``relevance[i-1]`` grades id i."""
    n = len(ranking)
    missed = [g for i, g in enumerate(relevance) if g > 0 and (i + 1) not in set(ranking)]
    scores = [float(2 * k_max + n - p) for p in range(n)] + [float(k_max)] * k_max + [-1.0] * len(missed)
    targets = [float(relevance[j - 1]) for j in ranking] + [0.0] * k_max + missed
    return torch.tensor(scores), torch.tensor(targets)


class RankingMetrics(nn.Module):
    """NDCG@k, Recall@k and MRR of generated rankings, accumulated over queries (torchmetrics).

    Args:
        ndcg_k: cut-offs of NDCG.
        recall_k: cut-offs of Recall.
    """

    def __init__(self, ndcg_k: Sequence[int] = (3, 5), recall_k: Sequence[int] = (3, 5)):
        super().__init__()
        self.k_max = max([*ndcg_k, *recall_k])
        self.ndcg = nn.ModuleDict({str(k): RetrievalNormalizedDCG(top_k=k) for k in ndcg_k})
        self.recall = nn.ModuleDict({str(k): RetrievalRecall(top_k=k) for k in recall_k})
        self.mrr = RetrievalMRR(top_k=self.k_max)
        self.queries = 0

    def update(self, rankings: Sequence[Sequence[int]], relevance: Sequence[Sequence[float]]) -> None:
        rows = [ranked_list_rows(r, rel, self.k_max) for r, rel in zip(rankings, relevance)]  # ok: host-side eval
        scores = torch.cat([s for s, _ in rows])
        target = torch.cat([t for _, t in rows])
        index = torch.cat([torch.full((len(s),), self.queries + q, dtype=torch.long) for q, (s, _) in enumerate(rows)])
        self.queries += len(rows)
        for m in self.ndcg.values():
            m.update(scores, target, indexes=index)
        for m in [*self.recall.values(), self.mrr]:
            m.update(scores, target > 0, indexes=index)

    def compute(self) -> dict[str, Tensor]:
        out = {f"ndcg@{k}": m.compute() for k, m in self.ndcg.items()}
        out.update({f"recall@{k}": m.compute() for k, m in self.recall.items()})
        out["mrr"] = self.mrr.compute()
        return out

    def reset(self) -> None:
        for m in [*self.ndcg.values(), *self.recall.values(), self.mrr]:
            m.reset()
        self.queries = 0
