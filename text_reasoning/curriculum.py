"""CurriculumData: training batches drawn distribution by distribution from a curriculum (DUMP).

Each task source of the data module is one distribution d_j (e.g. Knights-and-Knaves with 2..6 people and
arithmetic with 1..3 digits). For every prompt slot of a training batch, j ~ P(j) from the curriculum the module
carries (``model.selector: common.sampling.curriculum.DUMP``) and the prompt ~ Uniform(d_j), with replacement
(DUMP, arXiv 2504.09710, Algorithm 1). Every sample is tagged ``"distribution"``; the method part
``common.methods.sample_fields.SampleFields`` (``fields: {distribution: distribution}``) puts it in the declared
``RolloutBatch.distribution`` field that the curriculum reads.

Exact resume: the distributions are drawn in ``train_batch`` when the batch is about to be trained on (not when
Lightning prefetches it; refill rounds draw the same way), with a generator seeded by (data seed, batch number). The
draw is therefore a pure function of checkpointed state: the curriculum's buffers (model state) and
``batches_served`` (data-module state).

Data parallelism (DDP, W ranks): every rank draws the same global batch of W x ``prompts_per_step`` slots and trains
on its own slice (rank r: slots [r S, (r + 1) S)); the curriculum observes every rank's rows (gathered), so its state
and the draw are equal on all ranks, and equal to one process's with W x ``prompts_per_step`` prompts a step. Slots
are drawn with replacement (as in one process), so a prompt can recur within a global batch.
"""

from __future__ import annotations

import torch

from common.data import SEED_STRIDE, model_part
from common.sampling.curriculum import Curriculum
from text_reasoning.data import ReasoningData


class CurriculumData(ReasoningData):
    """:class:`text_reasoning.data.ReasoningData` whose training batches follow a distribution-level curriculum.

    Every training sample carries ``"distribution"``: the index of its task source. Without a curriculum as the
    module's ``selector`` (a :class:`common.sampling.curriculum.Curriculum`) the distributions are drawn
    uniformly, which is the baseline DUMP is compared with. Validation batches are the plain held-out set.

    Args: as :class:`text_reasoning.data.ReasoningData`.
    """

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        for sample, j in zip(self.train_set, self.train_sources):
            sample["distribution"] = j
        sources = torch.tensor(self.train_sources, dtype=torch.long)  # (N,)
        self.pools = [torch.nonzero(sources == j).squeeze(1) for j in range(len(self.tasks))]  # J x (N_j,)

    def curriculum(self) -> Curriculum | None:
        """The module's ``selector`` if it is a curriculum (checked to have one distribution per task source)."""
        found = model_part(self.trainer, "selector", Curriculum)
        if found is not None and found.num_distributions != len(self.tasks):
            raise ValueError(f"the curriculum has num_distributions={found.num_distributions} but the data module "
                             f"has {len(self.tasks)} task sources; they must match (one distribution per source)")
        return found

    def draw(self, batch_number: int, probs: torch.Tensor) -> list[dict]:
        """This rank's prompts of training batch ``batch_number``: per slot j ~ ``probs`` (J,), prompt ~ Uniform(d_j).

        Under data parallelism the global batch of ``world_size x prompts_per_step`` slots is drawn (the same on
        every rank: the curriculum's state is global, see ``DUMP``) and rank r keeps slots ``[r S, (r + 1) S)``, so
        the ranks' slots are disjoint and together they are one process's draw of ``world_size x S`` slots.
        """
        rank, world = self.rank_and_world()
        S, size = self.prompts_per_step, self.prompts_per_step * world
        gen = torch.Generator().manual_seed(self.seed * SEED_STRIDE + batch_number)
        slots = torch.multinomial(probs.detach().double().cpu(), size, replacement=True, generator=gen)  # (W S,)
        sizes = torch.tensor([len(p) for p in self.pools], dtype=torch.float64)[slots]  # (W S,)
        within = (torch.rand(size, generator=gen, dtype=torch.float64) * sizes).long()  # (W S,)
        mine = slice(rank * S, (rank + 1) * S)  # this rank's slots of the global batch
        return [self.train_set[int(self.pools[j][k])] for j, k in zip(slots[mine].tolist(), within[mine].tolist())]

    def train_batch(self, number: int) -> list[dict]:
        available = torch.tensor([len(p) > 0 for p in self.pools])  # (J,) sources without prompts are excluded
        curriculum = self.curriculum()
        probs = curriculum.probs(available) if curriculum is not None else available.double() / available.sum()
        return self.draw(number, probs)
