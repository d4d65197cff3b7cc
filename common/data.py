"""Domain-independent data plumbing: an endless reproducible prompt stream and a DataModule that knows its exact
data position (so a killed run resumes on the batch it would have trained on next)."""

from __future__ import annotations

from typing import Any, TypeVar

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

# Separates seeds derived from one data seed: validation sets are made with ``seed + SEED_STRIDE`` and per-batch
# generators are seeded with ``seed * SEED_STRIDE + batch``, so different data seeds never share a stream.
SEED_STRIDE = 1_000_003

Part = TypeVar("Part")


def model_part(trainer: L.Trainer | None, attribute: str, kind: type[Part]) -> Part | None:
    """The training module's component ``attribute`` (its declared ``selector`` or ``advantage``) when it is a
    ``kind``, else None (no trainer yet, or another component there).

    The one way a data module reaches model state that its draws follow (a curriculum's probabilities, a value
    tracker's priorities): by the module's declared attribute, not by searching its submodules.
    """
    module: Any = trainer.lightning_module if trainer is not None else None
    part = getattr(module, attribute) if module is not None else None
    return part if isinstance(part, kind) else None


class PromptStream(IterableDataset):
    """An endless, reproducible stream of prompt batches starting at batch ``start``, split by data-parallel rank.

    Pass ``c`` over the data is a permutation drawn from ``seed + c``; global batch ``b`` is its ``b``-th slice of
    ``world_size x batch_size`` prompts, a pure function of ``(data, world_size x batch_size, seed, b)``, so
    resuming at ``start = b`` continues exactly where a run stopped. Rank ``r`` yields prompts
    ``[r x batch_size, (r + 1) x batch_size)`` of every global batch: the ranks' prompts are disjoint and together
    they are exactly the single-process stream of ``world_size x batch_size`` prompts per batch.

    Args:
        samples: the training set.
        batch_size: prompts per batch on one rank.
        seed: seed of the shuffling.
        start: the first global batch to yield.
        rank, world_size: this process's data-parallel rank and the number of ranks.
    """

    def __init__(self, samples: list[dict], batch_size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank={rank}, world_size={world_size}")
        if batch_size <= 0 or batch_size * world_size > len(samples):
            raise ValueError(f"batch_size must be in [1, {len(samples) // world_size}] (the number of samples "
                             f"{len(samples)} over {world_size} rank(s)), got {batch_size}")
        self.samples, self.batch_size, self.seed, self.start = samples, batch_size, seed, start
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        size = self.batch_size * self.world_size  # the global batch
        per_pass = len(self.samples) // size
        lo = self.rank * self.batch_size  # this rank's slice of it
        b = self.start
        while True:
            pass_idx, j = divmod(b, per_pass)
            order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(self.seed + pass_idx))
            yield [self.samples[i] for i in order[j * size + lo : j * size + lo + self.batch_size].tolist()]
            b += 1


class ResumableData(L.LightningDataModule):
    """A training set streamed from its exact data position, and a validation set, shared by every domain's data
    module (a subclass fills ``train_set`` and ``val_set`` in ``setup``).

    Counts the training batches handed to the module (``batches_served``, in the checkpoint's DataModule state): the
    batch trained on at data position ``b`` is :meth:`train_batch` ``(b)``, resolved when Lightning hands it over, so
    a killed run resumes on the batch it would have trained on next. A step's refill rounds (dynamic sampling) take
    the following batches with :meth:`next_prompts`, which moves the position too: every batch of the stream is
    trained on once, and the next step continues after the refills.

    Under data parallelism (``--trainer.strategy ddp --trainer.devices N``, several nodes) the global batch is
    ``world_size x prompts_per_step`` prompts and rank ``r`` trains on its ``r``-th slice (:class:`PromptStream`,
    rank and world size from the Trainer): the ranks' prompts are disjoint and their union is what one process
    with ``world_size x prompts_per_step`` prompts per step would train on. ``batches_served`` counts global
    batches, the same number on every rank, so the checkpointed position is exact for all of them (resume with
    the same number of ranks). A prompt's G samples are drawn on the rank that holds the prompt, so every group
    lies on one rank and group statistics (GRPO's mean and std, RLOO, ...) need no communication.

    Args:
        prompts_per_step: prompts in a training batch on one rank.
        val_batch_size: prompts per validation batch.
        seed: seed of the stream's shuffling.
    """

    def __init__(self, prompts_per_step: int = 4, val_batch_size: int = 50, seed: int = 0):
        super().__init__()
        self.prompts_per_step, self.val_batch_size, self.seed = prompts_per_step, val_batch_size, seed
        self.train_set: list[dict] = []
        self.val_set: list[dict] = []
        self.batches_served = 0

    def rank_and_world(self) -> tuple[int, int]:
        """This process's data-parallel rank and the number of ranks, from the Trainer ((0, 1) without one)."""
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self.rank_and_world()
        stream = PromptStream(self.train_set, self.prompts_per_step, self.seed, start=self.batches_served,
                              rank=rank, world_size=world)
        # Its own generator: creating a DataLoader iterator draws a seed, which must not come from (and shift)
        # the global RNG that sampling uses, or a resumed run would sample differently from an uninterrupted one.
        return DataLoader(stream, batch_size=None, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False, collate_fn=list,
                          generator=torch.Generator().manual_seed(self.seed))

    def train_batch(self, number: int) -> list[dict]:
        """This rank's prompts of global training batch ``number``: a pure function of the number and of checkpointed
        state. A data module that draws its batches otherwise (a curriculum) overrides this, drawing the global
        batch of ``world_size x prompts_per_step`` prompts and keeping this rank's slice."""
        rank, world = self.rank_and_world()
        return next(iter(PromptStream(self.train_set, self.prompts_per_step, self.seed, start=number, rank=rank,
                                      world_size=world)))

    def next_prompts(self) -> list[dict]:
        """The batch at the data position, taken from the stream (the position moves past it). Lightning's batches
        come through here, and so do a step's refill rounds (``Loop.collect(more=...)``), as DAPO draws new prompts
        until its batch is full. Under DDP a rank refills from its own slices (prompts stay disjoint), but ranks
        that refill different numbers of times move apart, and the checkpoint keeps rank 0's position."""
        batch = self.train_batch(self.batches_served)
        self.batches_served += 1
        return batch

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Called for the batch about to be trained on (not for the one Lightning prefetches), so the data position
        # is exact here; the loader's own copy is replaced because refill rounds may have moved the position.
        if self.trainer is not None and self.trainer.training:
            batch = self.next_prompts()
        return batch

    def state_dict(self) -> dict:
        return {"batches_served": self.batches_served}

    def load_state_dict(self, state: dict) -> None:
        self.batches_served = int(state["batches_served"])
