"""SPO single-stream (arXiv 2509.13232) for text reasoning: prioritised prompt batches (shared/methods/text.md §11).

:class:`PrioritisedData` tags every training sample with ``"uid"`` (its index) and draws each training batch's
prompts without replacement from ``w(x) ∝ sqrt(v̂(1 − v̂)) / N_eff^γ + ε_explore`` of the module's value tracker
(its ``advantage``, a ``common.advantages.tracker.SPOTracker``). The draw happens in ``train_batch`` (for the batch
about to be trained on, and for refill rounds) with a generator seeded by (data seed, batch number): a pure function of
checkpointed state, so a resumed run continues exactly. Under data parallelism (W ranks) the global batch of
W x ``prompts_per_step`` distinct prompts is drawn on every rank alike (the tracker observes every rank's rows, so its
state is global) and rank r trains on its r-th slice.

The rest of the method is domain-free: ``common.methods.sample_fields.SampleFields`` (``{prompt_uid: uid}``) puts the
tag in ``RolloutBatch.prompt_uid`` for the tracker, and ``common.methods.spo_stream.SPOStream`` feeds the tracker
each update's KL(π_before ‖ π_after).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from common.advantages.tracker import SPOTracker
from common.data import SEED_STRIDE, model_part
from common.sampling.priority import spo_priority
from text_reasoning.data import ReasoningData


class PrioritisedData(ReasoningData):
    """Training prompts drawn by SPO's priority weights (uniformly while the module's ``advantage`` is no
    ``SPOTracker``).

    Args:
        gamma: γ of ``N_eff^γ`` in the priority weight, in [0, 1] [UNVERIFIED value].
        eps_explore: ε_explore added to every weight (SPO: 0.05).
        *args, **kwargs: as :class:`text_reasoning.data.ReasoningData`.
    """

    def __init__(self, *args: Any, gamma: float = 0.0, eps_explore: float = 0.05, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if eps_explore < 0:
            raise ValueError(f"eps_explore must be >= 0, got {eps_explore}")
        self.gamma, self.eps_explore = gamma, eps_explore

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        for i, sample in enumerate(self.train_set):
            sample["uid"] = i

    def probs(self) -> Tensor:
        """P(x) over the training prompts (N,)."""
        tracker = model_part(self.trainer, "advantage", SPOTracker)
        n = len(self.train_set)
        if tracker is None:
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        if tracker.num_prompts < n:
            raise ValueError(f"SPOTracker.num_prompts={tracker.num_prompts} is smaller than the {n} training prompts")
        return spo_priority(tracker.alpha[:n].cpu(), tracker.beta[:n].cpu(), gamma=self.gamma, eps_explore=self.eps_explore)

    def draw(self, batch_number: int, probs: Tensor) -> list[dict]:
        """This rank's prompts of training batch ``batch_number``: ``prompts_per_step`` distinct prompts ~ ``probs``
        (N,). Under data parallelism the global batch of ``world_size x prompts_per_step`` distinct prompts is drawn
        (the same on every rank: the tracker's state is global) and rank r keeps picks ``[r S, (r + 1) S)``: the
        ranks' prompts are disjoint and together they are one process's draw of ``world_size x S`` prompts."""
        rank, world = self.rank_and_world()
        S, size = self.prompts_per_step, self.prompts_per_step * world
        if size > probs.numel():
            raise ValueError(f"prompts_per_step x ranks = {self.prompts_per_step} x {world} must be at most the "
                             f"{probs.numel()} training prompts (train_size): a global batch draws distinct prompts")
        gen = torch.Generator().manual_seed(self.seed * SEED_STRIDE + batch_number)
        picks = torch.multinomial(probs.double().cpu(), size, replacement=False, generator=gen)  # (W S,)
        return [self.train_set[i] for i in picks[rank * S:(rank + 1) * S].tolist()]

    def train_batch(self, number: int) -> list[dict]:
        return self.draw(number, self.probs())
