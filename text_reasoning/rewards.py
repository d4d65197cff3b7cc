"""Rewards for the generated tasks of `text_reasoning.tasks` (same protocol as `common.rewards.math`).

    reward(completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> Tensor (B,) float32

`samples[i]` is `Problem.as_sample()`: prompt, answer, task, level and the task's meta keys.
Completions are untrusted: they are cut to their last `MAX_CHARS` characters, and Countdown
expressions are evaluated only by `safe_eval`'s whitelisted `ast` walk.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from common.rewards.expression import numbers_in, safe_eval
from common.rewards.math import MAX_CHARS, MathVerifyReward, NumericAnswerReward, PerSampleReward

# A line of arithmetic with at least one digit. The first class holds no digit, so the first digit is the \d and
# nothing backtracks: linear in the line (``[C]*\d[C]*`` took 0.7 s on a 10 kB line of digits ending in "=").
_EXPRESSION_LINE = re.compile(r"[+\-*/×÷(). \t]*[0-9][0-9+\-*/×÷(). \t]*")
_COUNTDOWN_TOLERANCE = 1e-6  # safe_eval is float64; exact rational answers land within 1e-9 of the target


def last_tagged(text: str, open_tag: str = "<answer>", close_tag: str = "</answer>") -> str | None:
    """The content of the last ``open_tag ... close_tag`` span, as ``re.findall(open.*?close, DOTALL)[-1]`` (spans
    from the left, each to the first closing tag after it, not overlapping), in one pass of ``str.find``: linear in
    ``len(text)`` (the lazy regex rescans the tail from every unclosed opening tag). None if there is none."""
    last, pos = None, 0
    while (start := text.find(open_tag, pos)) >= 0:
        end = text.find(close_tag, start + len(open_tag))
        if end < 0:
            break
        last, pos = text[start + len(open_tag):end], end + len(close_tag)
    return last


def _answer_region(completion: str) -> str:
    """The content of the last <answer>...</answer> if any, else the completion (last MAX_CHARS chars)."""
    text = completion[-MAX_CHARS:]
    tagged = last_tagged(text)
    return tagged if tagged is not None else text


def countdown_expression(completion: str) -> str | None:
    """The candidate expression of a Countdown completion.

    The content of the last `<answer>...</answer>` if present; otherwise the last line made
    only of digits, + - * / × ÷, parentheses and spaces (so a line with `=` never counts).
    """
    text = completion[-MAX_CHARS:]
    if (tagged := last_tagged(text)) is not None:
        return tagged.strip()
    lines = [line.strip() for line in text.splitlines() if _EXPRESSION_LINE.fullmatch(line.strip())]
    return lines[-1] if lines else None


class CountdownReward(PerSampleReward):
    """`correct` if the expression uses exactly `sample["numbers"]` (as a multiset, integer
    literals only) and equals `sample["target"]`; `format_only` if an expression was found
    and is valid arithmetic but wrong; 0.0 if none was found or it is not valid arithmetic.
    """

    def __init__(self, correct: float = 1.0, format_only: float = 0.1) -> None:
        self.correct, self.format_only = float(correct), float(format_only)

    def score(self, completion: str, sample: Mapping[str, Any]) -> float:
        numbers, target = sorted(sample["numbers"]), sample["target"]
        expr = countdown_expression(completion)
        value = None if expr is None else safe_eval(expr)
        if value is None:
            return 0.0
        uses_numbers = "." not in expr and sorted(numbers_in(expr)) == numbers
        return self.correct if uses_numbers and abs(value - target) <= _COUNTDOWN_TOLERANCE else self.format_only


class KnightsKnavesReward(PerSampleReward):
    """1.0 if the completion calls every person in `sample["names"]` what `sample["solution"]`
    says (True = knight), else 0.0.

    Claims are "<name> is a knight" / "<name> is a knave" (case-insensitive), read inside
    the last <answer>...</answer> if present, else in the whole completion; for each name the
    last claim wins, so a final summary overrides earlier hypotheses.
    """

    def score(self, completion: str, sample: Mapping[str, Any]) -> float:
        names, solution = list(sample["names"]), list(sample["solution"])
        alternatives = "|".join(re.escape(name) for name in names)
        claim = re.compile(rf"\b({alternatives})\s+is\s+an?\s+(knight|knave)\b", re.IGNORECASE)
        canonical = {name.lower(): name for name in names}
        said = {}  # name -> claimed knight?
        for match in claim.finditer(_answer_region(completion)):
            said[canonical[match.group(1).lower()]] = match.group(2).lower() == "knight"
        return float(all(said.get(name) == bool(knight) for name, knight in zip(names, solution)))


class TaskReward(PerSampleReward):
    """Dispatch on `sample["task"]`: arithmetic -> NumericAnswerReward, countdown ->
    CountdownReward, knights_knaves -> KnightsKnavesReward (each with its defaults); the tasks of local files
    (``text_reasoning.data.LocalFile``): gsm8k -> NumericAnswerReward (the completion's last number, GSM8K's own
    check), math and plain -> MathVerifyReward (the last ``\\boxed{}``, else the last number, by math-verify)."""

    def __init__(self) -> None:
        math_verify = MathVerifyReward()
        self.rewards: dict[str, PerSampleReward] = {
            "arithmetic": NumericAnswerReward(),
            "countdown": CountdownReward(),
            "knights_knaves": KnightsKnavesReward(),
            "gsm8k": NumericAnswerReward(),
            "math": math_verify,
            "plain": math_verify,
        }

    def score(self, completion: str, sample: Mapping[str, Any]) -> float:
        task = sample.get("task")
        if task not in self.rewards:
            raise ValueError(f"sample['task'] must be one of {sorted(self.rewards)}, got {task!r}")
        return self.rewards[task].score(completion, sample)
