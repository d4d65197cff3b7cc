"""SPO-tree's on-policy edge replay buffer (Segment Policy Optimization, arXiv 2505.23564; authors' code
``hybrid_episode_generator.py``): a tree yields far more edges than one iteration trains on, so edges wait in a
buffer for a few iterations.

    add:    the step's edges with A ≠ 0, stamped with the step t
    expire: drop edges with t − stamp >= max_age                          (authors: 8 iterations)
    use:    per question, up to ``per_question`` edges drawn at random    (authors: 32), then removed

The draw uses a generator seeded with ``seed + t``, so a resumed run draws the same edges without saving RNG
state; the buffer's rows (token ids, masks, advantages, rewards, stamps, sample metadata and texts) are the module's
extra state and so are in the Lightning checkpoint. Which edges the authors draw when there are more than 32
(random or first) is not stated in the spec; random is used here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from common.batch import RolloutBatch
from common.sampling.base import Selector

_TENSOR_FIELDS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "group_ids", "rewards", "advantages")


def rank_within(keys: Tensor, group: Tensor) -> Tensor:
    """Rank of every row's key among the rows of its group (0 = smallest), ties by row order.
    Reference: ``sum(1 for j in group(i) if (keys[j], j) < (keys[i], i))``. Shapes: (N,), (N,) -> (N,) long."""
    order = torch.sort(keys, stable=True).indices  # (N,)
    order = order[torch.sort(group[order], stable=True).indices]  # (N,) by group, then key
    g = group[order]
    start = torch.searchsorted(g, g, right=False)  # (N,) first position of each row's group in the sorted order
    rank = torch.arange(len(order), device=keys.device) - start
    return torch.empty_like(rank).scatter_(0, order, rank)


class SegmentEdgeBuffer(nn.Module, Selector):
    """On-policy edge replay buffer of SPO-tree (use after ``common.advantages.segment.SPOTree``).

    Args:
        max_age: steps an edge may wait before it is dropped (authors 8).
        per_question: edges trained on per question per step (authors 32); questions are told apart by the
            sample's ``prompt``.
        seed: seed of the random draw (reseeded with ``seed + step`` every step).
    """

    def __init__(self, max_age: int = 8, per_question: int = 32, seed: int = 0):
        problems = [f"{name} must be a positive integer, got {v}" for name, v in
                    (("max_age", max_age), ("per_question", per_question)) if v < 1]
        if problems:
            raise ValueError("SegmentEdgeBuffer: " + "; ".join(problems))
        super().__init__()
        self.max_age, self.per_question, self.seed = max_age, per_question, seed
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.edges: RolloutBatch | None = None  # rows waiting in the buffer
        self.stamps = torch.zeros(0, dtype=torch.long)  # (N,) step each row was added

    def __len__(self) -> int:
        return 0 if self.edges is None else self.edges.batch_size

    def __call__(self, rollouts: RolloutBatch) -> RolloutBatch:
        if rollouts.advantages is None or (rollouts.batch_size and not rollouts.samples):
            raise ValueError("SegmentEdgeBuffer needs rows with advantages and samples (metadata with 'prompt')")
        t = int(self.step)  # ok: once per step, a CPU counter
        new = rollouts.replace(behaviour_logprobs=None, old_logprobs=None, ref_logprobs=None, reward_components=None,
                               reward_names=(), truncated=None, correct=None)
        stamps = torch.cat([self.stamps, torch.full((new.batch_size,), t, dtype=torch.long)])
        pool = new if self.edges is None else RolloutBatch.cat([self.edges, new.to(self.edges.prompt_ids.device)])
        alive = (t - stamps) < self.max_age  # (N,)
        questions: dict[str, int] = {}
        qid = torch.tensor([questions.setdefault(s["prompt"], len(questions)) for s in pool.samples], dtype=torch.long)
        g = torch.Generator().manual_seed(self.seed + t)
        keys = torch.rand(pool.batch_size, generator=g).masked_fill(~alive, float("inf"))  # (N,) expired last
        use = alive & (rank_within(keys, qid) < self.per_question)  # (N,)
        keep = alive & ~use
        self.edges, self.stamps = pool.select(keep), stamps[keep]
        out = pool.select(use)
        _, inverse = torch.unique(out.group_ids, return_inverse=True)
        return out.replace(group_ids=inverse.to(out.group_ids.dtype))

    def finalize(self, kept: RolloutBatch) -> RolloutBatch:
        self.step += 1
        return kept

    # the rows are variable-width, so they are extra state rather than buffers
    def get_extra_state(self) -> dict[str, Any]:
        if self.edges is None:
            return {"stamps": self.stamps}
        e = self.edges
        return {"stamps": self.stamps, **{f: getattr(e, f) for f in _TENSOR_FIELDS},
                "samples": [dict(s) for s in e.samples], "completions": list(e.completions)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.stamps = state["stamps"]
        if "prompt_ids" not in state:
            self.edges = None
            return
        fields = {f: state[f] for f in _TENSOR_FIELDS}
        self.edges = RolloutBatch(**fields, samples=list(state["samples"]), completions=list(state["completions"]))

    def _apply(self, fn, recurse=True):  # keep the rows on the module's device
        super()._apply(fn, recurse)
        if self.edges is not None:
            self.edges = dataclasses.replace(self.edges, **{f: fn(getattr(self.edges, f)) for f in _TENSOR_FIELDS})
        return self
