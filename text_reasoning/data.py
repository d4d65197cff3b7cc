"""Task sources and the DataModule for math and logic reasoning.

A task source is a small typed object (named by ``class_path`` in YAML) whose ``make(n, seed)`` returns
``Problem``s: generated tasks (arithmetic, countdown, Knights-and-Knaves) or a local GSM8K, MATH or other
prompt/answer file (``LocalFile``). Batches are lists of sample dicts (``prompt``, ``answer``, ``task``, ``level``, ...).
"""

from __future__ import annotations

import random
from typing import Literal


from common.data import SEED_STRIDE, PromptStream, ResumableData  # noqa: F401 - PromptStream is part of this API
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
    """Problems from a local ``.jsonl`` / ``.json`` / ``.parquet`` file, read once at construction (so a bad file
    fails at start-up, naming it; nothing is downloaded). ``make(n, seed)`` draws ``n`` rows without replacement
    (all of them, shuffled, when ``n`` >= the rows).

    Args:
        path: the file (``~`` is expanded; a relative path is relative to the working directory).
        format: how the answer column is read, and the samples' ``task``, which picks the default verifier
            (``text_reasoning.rewards.TaskReward``):
            "gsm8k": a GSM8K solution ending ``#### 72`` -> "72"; checked as a number (the completion's last number);
            "math": a MATH solution -> the content of its last ``\\boxed{...}``; checked by math-verify;
            "plain": the column holds the final answer itself; checked by math-verify (numbers, fractions, LaTeX).
        prompt_column: the column with the problem text (default: "question" for gsm8k, "problem" for math,
            "prompt" for plain).
        answer_column: the column with the solution or answer (default: "answer" for gsm8k, "solution" for math,
            "answer" for plain).
    """

    def __init__(self, path: str, format: Literal["gsm8k", "math", "plain"] = "gsm8k", prompt_column: str | None = None,
                 answer_column: str | None = None):
        self.path, self.format = path, format
        self.prompt_column, self.answer_column = prompt_column, answer_column
        self.problems = tasks.local_problems(path, format, prompt_column, answer_column)  # (rows,) in file order

    def make(self, n: int, seed: int) -> list[Problem]:
        order = list(range(len(self.problems)))
        random.Random(seed).shuffle(order)
        return [self.problems[i] for i in order[:n]]


class ReasoningData(ResumableData):
    """Training prompts drawn from ``tasks`` and a held-out validation set that shares no prompt with them.

    Args:
        tasks: task sources; the training set is their union (equal shares).
        train_size: training problems; the stream cycles through them, reshuffled on every pass.
        val_size: held-out problems for validation (greedy accuracy, pass@k).
        prompts_per_step: prompts in a training batch (each is sampled G times by the module).
        val_batch_size: prompts per validation batch.
        seed: seed of the generators and of the shuffling.
        val_tasks: task sources of the validation problems instead of ``tasks`` (e.g. a GSM8K test file beside the
            train file; equal shares); training never sees a validation prompt either way. None = held out from
            ``tasks``.
    """

    def __init__(
        self,
        tasks: list[TaskSource] | None = None,
        train_size: int = 4096,
        val_size: int = 200,
        prompts_per_step: int = 4,
        val_batch_size: int = 50,
        seed: int = 0,
        val_tasks: list[TaskSource] | None = None,
    ):
        super().__init__(prompts_per_step, val_batch_size, seed)
        self.tasks = tasks if tasks is not None else [Arithmetic()]
        self.val_tasks = val_tasks
        self.train_size, self.val_size = train_size, val_size
        self.train_sources: list[int] = []

    def setup(self, stage: str | None = None) -> None:
        if self.val_set:
            return
        val_sources = self.val_tasks or self.tasks
        v = len(val_sources)
        val = [p for i, t in enumerate(val_sources) for p in t.make(self.val_size // v + (i < self.val_size % v), self.seed + SEED_STRIDE)]
        held_out = {p.prompt for p in val}
        train, sources = [], []
        k = len(self.tasks)
        for i, t in enumerate(self.tasks):
            n = self.train_size // k + (i < self.train_size % k)
            made = [p for p in t.make(n + len(held_out), self.seed + i) if p.prompt not in held_out][:n]
            train += made
            sources += [i] * len(made)
        self.train_set = [p.as_sample() for p in train]
        self.train_sources = sources  # (train_size,) index of the task source of each training sample
        self.val_set = [p.as_sample() for p in val]

