"""Task sources and the DataModule of generate-and-rank (F-GRPO): recommendation and multi-hop QA pools.

A task source is a small typed object (``class_path`` in YAML) whose ``make(n, seed, scorer)`` returns sample
dicts (see :mod:`retrieval.tasks`). The first-stage retriever that builds the pools is the sentence-embedding
model (all-MiniLM-L6-v2, :class:`retrieval.embedding.MiniLMEncoder`) or, with ``first_stage: latent``, the
task's own signal (latent dot product / lexical overlap), which needs no model.
"""

from __future__ import annotations

from typing import Literal


from common.data import SEED_STRIDE, ResumableData
from retrieval import tasks
from retrieval.tasks import Scorer


class TaskSource:
    """Base class: ``make(n, seed, scorer) -> list[dict]``."""

    def make(self, n: int, seed: int, scorer: Scorer | None) -> list[dict]:
        raise NotImplementedError


class Recommendation(TaskSource):
    """Sequential recommendation: a user's history -> the next items among ``pool_size`` candidates.

    Args:
        num_items: catalogue size.
        dim: latent attributes per item (<= 8, each names a title word).
        history_len: items in a user's history.
        pool_size: candidates per prompt (the paper's 20).
        num_hard: hard distractors (the first stage's best non-relevant items) in each pool.
        max_slate: most ids in the slate (the paper's n = 10).
        rank_k: ids in the ranking (the paper's 5).
        catalogue_seed: seed of the catalogue (shared by train and validation).
    """

    def __init__(self, num_items: int = 200, dim: int = 8, history_len: int = 5, pool_size: int = 20, num_hard: int = 5,
                 max_slate: int = 10, rank_k: int = 5, catalogue_seed: int = 0):
        self.cat = tasks.catalogue(num_items, dim, catalogue_seed)
        self.kw = dict(history_len=history_len, pool_size=pool_size, num_hard=num_hard, max_slate=max_slate, rank_k=rank_k)

    def make(self, n: int, seed: int, scorer: Scorer | None) -> list[dict]:
        return tasks.recommendation(n, seed, cat=self.cat, scorer=scorer, **self.kw)


class MultiHopQA(TaskSource):
    """Multi-hop QA: select and order the 2-4 supporting passages among ``pool_size``.

    Args:
        pool_size: candidate passages per question (the paper's 20).
        num_hard: hard distractors per pool.
        max_slate: most ids in the slate.
        rank_k: ids in the ranking.
    """

    def __init__(self, pool_size: int = 20, num_hard: int = 5, max_slate: int = 10, rank_k: int = 5):
        self.kw = dict(pool_size=pool_size, num_hard=num_hard, max_slate=max_slate, rank_k=rank_k)

    def make(self, n: int, seed: int, scorer: Scorer | None) -> list[dict]:
        return tasks.multihop_qa(n, seed, scorer=scorer, **self.kw)


class RetrievalData(ResumableData):
    """Training pools from ``tasks`` and held-out validation pools (different seeds: different users/questions).

    Args:
        tasks: task sources; the training set is their union (equal shares).
        first_stage: "embedding" (all-MiniLM-L6-v2 builds the pools) or "latent" (the task's own signal, no model).
        train_size: training prompts.
        val_size: validation prompts.
        prompts_per_step: prompts per training batch (each sampled G times by the module).
        val_batch_size: prompts per validation batch.
        seed: seed of generation and shuffling.
    """

    def __init__(self, tasks: list[TaskSource] | None = None, first_stage: Literal["embedding", "latent"] = "embedding",
                 train_size: int = 1024, val_size: int = 64, prompts_per_step: int = 4, val_batch_size: int = 16,
                 seed: int = 0):
        if first_stage not in ("embedding", "latent"):
            raise ValueError(f"first_stage must be 'embedding' or 'latent', got {first_stage!r}")
        super().__init__(prompts_per_step, val_batch_size, seed)
        self.tasks = tasks if tasks is not None else [Recommendation()]
        self.first_stage, self.train_size, self.val_size = first_stage, train_size, val_size

    def setup(self, stage: str | None = None) -> None:
        if self.val_set:
            return
        scorer = None
        if self.first_stage == "embedding":
            from retrieval.embedding import MiniLMEncoder

            scorer = MiniLMEncoder()
        k = len(self.tasks)
        for i, t in enumerate(self.tasks):
            self.train_set += t.make(self.train_size // k + (i < self.train_size % k), self.seed + i, scorer)
            self.val_set += t.make(self.val_size // k + (i < self.val_size % k), self.seed + SEED_STRIDE + i, scorer)

