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
    """An endless, reproducible stream of prompt batches starting at batch ``start``.

    Pass ``c`` over the data is a permutation drawn from ``seed + c``, so batch ``b`` is a pure function of
    ``(data, batch_size, seed, b)``: resuming at ``start = b`` continues exactly where a run stopped.
    """

    def __init__(self, samples: list[dict], batch_size: int, seed: int, start: int = 0):
        if batch_size <= 0 or batch_size > len(samples):
            raise ValueError(f"batch_size must be in [1, {len(samples)}] (the number of samples), got {batch_size}")
        self.samples, self.batch_size, self.seed, self.start = samples, batch_size, seed, start

    def __iter__(self):
        per_pass = len(self.samples) // self.batch_size
        b = self.start
        while True:
            pass_idx, j = divmod(b, per_pass)
            order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(self.seed + pass_idx))
            yield [self.samples[i] for i in order[j * self.batch_size : (j + 1) * self.batch_size].tolist()]
            b += 1


class ResumableData(L.LightningDataModule):
    """A training set streamed from its exact data position, and a validation set, shared by every domain's data
    module (a subclass fills ``train_set`` and ``val_set`` in ``setup``).

    Counts the training batches handed to the module (``batches_served``, in the checkpoint's DataModule state) and
    starts the stream at that count, so a killed run resumes on the batch it would have trained on next.

    Args:
        prompts_per_step: prompts in a training batch.
        val_batch_size: prompts per validation batch.
        seed: seed of the stream's shuffling.
    """

    def __init__(self, prompts_per_step: int = 4, val_batch_size: int = 50, seed: int = 0):
        super().__init__()
        self.prompts_per_step, self.val_batch_size, self.seed = prompts_per_step, val_batch_size, seed
        self.train_set: list[dict] = []
        self.val_set: list[dict] = []
        self.batches_served = 0

    def train_dataloader(self) -> DataLoader:
        stream = PromptStream(self.train_set, self.prompts_per_step, self.seed, start=self.batches_served)
        # Its own generator: creating a DataLoader iterator draws a seed, which must not come from (and shift)
        # the global RNG that sampling uses, or a resumed run would sample differently from an uninterrupted one.
        return DataLoader(stream, batch_size=None, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False, collate_fn=list,
                          generator=torch.Generator().manual_seed(self.seed))

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Called for the batch about to be trained on (not for the one Lightning prefetches), so this count is
        # the exact data position to resume from.
        if self.trainer is not None and self.trainer.training:
            self.batches_served += 1
        return batch

    def state_dict(self) -> dict:
        return {"batches_served": self.batches_served}

    def load_state_dict(self, state: dict) -> None:
        self.batches_served = int(state["batches_served"])
