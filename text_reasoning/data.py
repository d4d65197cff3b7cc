"""Task sources and the DataModule for math and logic reasoning.

A task source is a small typed object (named by ``class_path`` in YAML) whose ``make(n, seed)`` returns
``Problem``s: generated tasks (arithmetic, countdown, Knights-and-Knaves) or local GSM8K/MATH files read with
HF ``datasets``. Batches are lists of sample dicts (``prompt``, ``answer``, ``task``, ``level``, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal


from common.data import SEED_STRIDE, PromptStream, ResumableData  # noqa: F401 - PromptStream is part of this API
from common.rewards.math import extract_boxed, gsm8k_answer
from text_reasoning import tasks
from text_reasoning.tasks import Problem


class TaskSource:
    """Base class: ``make(n, seed) -> list[Problem]``."""

    def make(self, n: int, seed: int) -> list[Problem]:
        raise NotImplementedError


class Arithmetic(TaskSource):
    """Integer arithmetic ``"What is 23 + 45?"``.

    Args:
        digits: digits per operand (1-4); the difficulty level.
        ops: operators to draw from, a subset of "+-*".
    """

    def __init__(self, digits: int = 2, ops: str = "+"):
        self.digits, self.ops = digits, ops

    def make(self, n: int, seed: int) -> list[Problem]:
        return tasks.arithmetic(n, digits=self.digits, ops=self.ops, seed=seed)


class Countdown(TaskSource):
    """Reach a target with the given numbers, each used once, with + - * /.

    Args:
        num_numbers: how many numbers are given (the difficulty level).
        max_number: largest given number.
    """

    def __init__(self, num_numbers: int = 3, max_number: int = 50):
        self.num_numbers, self.max_number = num_numbers, max_number

    def make(self, n: int, seed: int) -> list[Problem]:
        return tasks.countdown(n, num_numbers=self.num_numbers, max_number=self.max_number, seed=seed)


class KnightsKnaves(TaskSource):
    """Knights-and-Knaves puzzles with a unique verified solution.

    Args:
        num_people: 2-6 people (the difficulty level).
    """

    def __init__(self, num_people: int = 3):
        self.num_people = num_people

    def make(self, n: int, seed: int) -> list[Problem]:
        return tasks.knights_knaves(n, num_people=self.num_people, seed=seed)


class LocalFile(TaskSource):
    """A local jsonl/parquet file in GSM8K (``question``, ``answer`` ending ``#### N``) or MATH (``problem``,
    ``solution`` with ``\\boxed{}``) format, read with HF ``datasets`` (no network).

    Args:
        path: the .jsonl / .json / .parquet file.
        format: "gsm8k" or "math".
    """

    def __init__(self, path: str, format: Literal["gsm8k", "math"] = "gsm8k"):
        if format not in ("gsm8k", "math"):
            raise ValueError(f"format must be 'gsm8k' or 'math', got {format!r}")
        self.path, self.format = path, format

    def make(self, n: int, seed: int) -> list[Problem]:
        import datasets

        suffix = Path(self.path).suffix
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
        if kind is None:
            raise ValueError(f"path must end in .jsonl, .json or .parquet, got {self.path!r}")
        ds = datasets.load_dataset(kind, data_files=str(self.path), split="train")
        cols = ("question", "answer") if self.format == "gsm8k" else ("problem", "solution")
        missing = [c for c in cols if c not in ds.column_names]
        if missing:
            raise ValueError(f"{self.path} is not in {self.format} format: missing columns {missing} (has {ds.column_names})")
        rows = ds.shuffle(seed=seed).select(range(min(n, len(ds)))) if n < len(ds) else ds
        out = []
        for row in rows:
            if self.format == "gsm8k":
                answer = gsm8k_answer(row["answer"])
            else:
                answer = extract_boxed(row["solution"]) or ""
            out.append(Problem(prompt=row[cols[0]], answer=answer, task=self.format, level=int(row.get("level", 0) or 0) if str(row.get("level", "0")).isdigit() else 0))
        return out


class ReasoningData(ResumableData):
    """Training prompts drawn from ``tasks`` and a held-out validation set that shares no prompt with them.

    Args:
        tasks: task sources; the training set is their union (equal shares).
        train_size: training problems; the stream cycles through them, reshuffled on every pass.
        val_size: held-out problems for validation (greedy accuracy, pass@k).
        prompts_per_step: prompts in a training batch (each is sampled G times by the module).
        val_batch_size: prompts per validation batch.
        seed: seed of the generators and of the shuffling.
    """

    def __init__(
        self,
        tasks: list[TaskSource] | None = None,
        train_size: int = 4096,
        val_size: int = 200,
        prompts_per_step: int = 4,
        val_batch_size: int = 50,
        seed: int = 0,
    ):
        super().__init__(prompts_per_step, val_batch_size, seed)
        self.tasks = tasks if tasks is not None else [Arithmetic()]
        self.train_size, self.val_size = train_size, val_size
        self.train_sources: list[int] = []

    def setup(self, stage: str | None = None) -> None:
        if self.val_set:
            return
        k = len(self.tasks)
        val = [p for i, t in enumerate(self.tasks) for p in t.make(self.val_size // k + (i < self.val_size % k), self.seed + SEED_STRIDE)]
        held_out = {p.prompt for p in val}
        train, sources = [], []
        for i, t in enumerate(self.tasks):
            n = self.train_size // k + (i < self.train_size % k)
            made = [p for p in t.make(n + len(held_out), self.seed + i) if p.prompt not in held_out][:n]
            train += made
            sources += [i] * len(made)
        self.train_set = [p.as_sample() for p in train]
        self.train_sources = sources  # (train_size,) index of the task source of each training sample
        self.val_set = [p.as_sample() for p in val]

