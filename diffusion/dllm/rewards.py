"""Rewards of the chain-sum task (domains.md §1(e)): 1.0 if the character after the first ``#`` is the answer,
plus 0.1 if the completion has exactly one ``#``. Completions are untrusted: cut to their last ``MAX_CHARS``
characters, only compared as strings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.rewards.math import MAX_CHARS, PerSampleReward


def chain_sum_answer(completion: str) -> str | None:
    """The character after the first ``#`` (None if there is no ``#`` or nothing after it)."""
    text = completion[-MAX_CHARS:]
    i = text.find("#")
    return text[i + 1] if 0 <= i < len(text) - 1 else None


class ChainSumReward(PerSampleReward):
    """``correct`` if the answer after ``#`` equals ``sample["answer"]``, plus ``format_bonus`` for exactly one ``#``.

    Args:
        correct: reward of a correct answer.
        format_bonus: reward of exactly one ``#``.
    """

    def __init__(self, correct: float = 1.0, format_bonus: float = 0.1):
        self.correct, self.format_bonus = float(correct), float(format_bonus)

    def score(self, completion: str, sample: Mapping[str, Any]) -> float:
        text = completion[-MAX_CHARS:]
        right = chain_sum_answer(text) == str(sample["answer"])
        return self.correct * right + self.format_bonus * (text.count("#") == 1)


class ChainSumCorrect(ChainSumReward):
    """The verifier: 1.0 for a correct answer, 0 otherwise (no format bonus)."""

    def __init__(self):
        super().__init__(correct=1.0, format_bonus=0.0)


__all__ = ["ChainSumCorrect", "ChainSumReward", "chain_sum_answer"]
