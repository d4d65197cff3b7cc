"""SFT traces of the generated reasoning tasks: each problem with a reference solution as the response.

:func:`reference_solution` writes a short worked answer that the task's own verifier (``TaskReward``) accepts:

- arithmetic: ``"23 + 45 = 68. The answer is 68."`` (the last number is the answer, as ``NumericAnswerReward`` reads);
- countdown: ``"<answer>(3 + 5) * 7</answer>"`` (the stored expression that reaches the target);
- knights and knaves: ``"<answer>Alice is a knight, Bob is a knave</answer>"``.

:class:`TaskTraces` is an SFT source (``common.sft.SFTData``): it draws the problems exactly as the RL recipe's
``ReasoningData`` does with the same ``tasks`` and seed, so the problems that data module holds out for validation
(``held_out`` of them) are never trained on here, and the RL run after SFT is evaluated on problems SFT never saw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from common.sft import SFTSource
from text_reasoning.data import ReasoningData, TaskSource


def reference_solution(sample: Mapping[str, Any]) -> str:
    """A worked reference answer of a ``Problem.as_sample()`` dict (module docstring)."""
    task = sample.get("task")
    if task == "arithmetic":
        a, b = sample["operands"]
        return f"{a} {sample['op']} {b} = {sample['answer']}. The answer is {sample['answer']}."
    if task in ("countdown", "knights_knaves"):
        return f"<answer>{sample['answer']}</answer>"
    raise ValueError(f"reference_solution: sample['task'] must be 'arithmetic', 'countdown' or 'knights_knaves', got {task!r}")


class TaskTraces(SFTSource):
    """Generated reasoning problems with their reference solutions (module docstring).

    Args:
        tasks: task sources (``text_reasoning.data.Arithmetic``, ``Countdown``, ``KnightsKnaves``); equal shares.
        size: problems made when the data module asks for all (``train_size`` None).
        held_out: the validation size of the RL recipe's ``ReasoningData`` (its ``val_size``): those problems are
            excluded, so they stay unseen.
    """

    def __init__(self, tasks: Sequence[TaskSource] = (), size: int = 4096, held_out: int = 200):
        if not tasks:
            raise ValueError("TaskTraces: tasks is empty; give e.g. text_reasoning.data.Arithmetic")
        self.tasks, self.size, self.held_out = list(tasks), size, held_out

    def make(self, n: int | None, seed: int) -> list[dict]:
        data = ReasoningData(self.tasks, train_size=self.size if n is None else n, val_size=self.held_out, seed=seed)
        data.setup()
        return [dict(s, response=reference_solution(s)) for s in data.train_set]


__all__ = ["TaskTraces", "reference_solution"]
