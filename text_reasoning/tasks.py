"""Seeded generators of verifiable reasoning problems: arithmetic, Countdown, knights and knaves; and problems read
from local files (GSM8K, MATH, or any table with a prompt and an answer column: ``local_problems``).

Each generator takes `n` and a `seed` and returns `list[Problem]`; the same arguments give
the same problems (a private `random.Random(seed)`, no global state). Answers are checked
at generation time by brute force: every Countdown target is reached by the stored
expression using each number once, and every knights-and-knaves puzzle has exactly one
consistent assignment among the 2^N.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.files import read_rows


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer. `meta` carries task-specific data for rewards."""

    prompt: str
    answer: str
    task: str
    level: int
    meta: dict = field(default_factory=dict)

    def as_sample(self) -> dict[str, Any]:
        """Plain dict for rewards: prompt, answer, task, level, plus the `meta` keys merged in."""
        return {"prompt": self.prompt, "answer": self.answer, "task": self.task, "level": self.level, **self.meta}


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int (number of problems), got {n!r}")


# ---------------------------------------------------------------- arithmetic

_OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic(n: int, *, digits: int = 2, ops: str = "+", seed: int = 0) -> list[Problem]:
    """`n` problems "What is a op b?" with `digits`-digit operands (1 digit: 0-9) and op drawn from `ops`.

    Problems are distinct while `n` <= the number of possible problems. level = digits.
    """
    _check_n(n)
    if digits not in (1, 2, 3, 4):
        raise ValueError(f"digits must be 1, 2, 3 or 4, got {digits!r}")
    if not ops or set(ops) - set(_OPS):
        raise ValueError(f"ops must be a non-empty string of characters from '+-*', got {ops!r}")
    rng, low, high = random.Random(seed), (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    ops = "".join(sorted(set(ops), key="+-*".index))  # the same draws for "*+" and "+*"
    distinct = n <= (high - low + 1) ** 2 * len(ops)
    seen: set[tuple[int, str, int]] = set()
    problems = []
    while len(problems) < n:
        a, op, b = rng.randint(low, high), rng.choice(ops), rng.randint(low, high)
        if distinct and (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        meta = {"operands": [a, b], "op": op}
        problems.append(Problem(f"What is {a} {op} {b}?", str(_OPS[op](a, b)), "arithmetic", digits, meta))
    return problems


# ---------------------------------------------------------------- countdown

_MAX_TARGET = 1000  # targets are drawn from the reachable integers in [1, _MAX_TARGET]


def countdown_solutions(numbers: list[int]) -> dict[int, str]:
    """Every integer reachable with + - * / using each of `numbers` exactly once -> one expression for it.

    Exhaustive over binary expression trees, by dynamic programming over subsets (masks).
    Intermediate results stay integers: a / b is used only when b divides a exactly.
    """
    if not 1 <= len(numbers) <= 6:
        raise ValueError(f"numbers must hold 1 to 6 integers, got {numbers!r}")
    full = (1 << len(numbers)) - 1
    reach: dict[int, dict[int, str]] = {1 << i: {x: str(x)} for i, x in enumerate(numbers)}
    for mask in sorted(range(1, full + 1), key=lambda m: bin(m).count("1")):
        if mask in reach:  # a single number
            continue
        values: dict[int, str] = {}
        sub = (mask - 1) & mask
        while sub:  # every split of `mask` into (sub, rest), both orders
            rest = mask ^ sub
            for (a, ea), (b, eb) in itertools.product(reach[sub].items(), reach[rest].items()):
                ea_p, eb_p = (e if e.isdigit() else f"({e})" for e in (ea, eb))
                candidates = [(a + b, f"{ea_p} + {eb_p}"), (a - b, f"{ea_p} - {eb_p}"), (a * b, f"{ea_p} * {eb_p}")]
                if b != 0 and a % b == 0:
                    candidates.append((a // b, f"{ea_p} / {eb_p}"))
                for value, expr in candidates:
                    values.setdefault(value, expr)
            sub = (sub - 1) & mask
        reach[mask] = values
    return reach[full]


def countdown(n: int, *, num_numbers: int = 3, max_number: int = 50, seed: int = 0) -> list[Problem]:
    """`n` Countdown problems: reach a target with `num_numbers` numbers from 1..max_number,
    each used exactly once, and + - * /.

    The target is drawn uniformly from the integers in [1, 1000] reachable with integer
    intermediate results (found by `countdown_solutions`); `answer` is one such expression.
    meta: `numbers`, `target`. level = num_numbers. Cost grows fast: 6 numbers take ~0.1 s each.
    """
    _check_n(n)
    if not 2 <= num_numbers <= 6:
        raise ValueError(f"num_numbers must be in 2..6, got {num_numbers!r}")
    if max_number < 1:
        raise ValueError(f"max_number must be >= 1, got {max_number!r}")
    rng, problems = random.Random(seed), []
    while len(problems) < n:
        numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
        solutions = countdown_solutions(numbers)
        targets = sorted(v for v in solutions if 1 <= v <= _MAX_TARGET)
        if not targets:
            continue
        target = rng.choice(targets)
        prompt = (
            f"Using the numbers {numbers}, each exactly once, and the operations + - * /, "
            f"write an expression that equals {target}. Give the expression inside <answer> </answer> tags."
        )
        meta = {"numbers": numbers, "target": target}
        problems.append(Problem(prompt, solutions[target], "countdown", num_numbers, meta))
    return problems


# ---------------------------------------------------------------- knights and knaves

_NAMES = ("Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Oscar")
_MAX_ATTEMPTS = 100_000  # rejection sampling; 6 people need ~10 attempts per puzzle on average

# kind -> (statement text, truth value given x's and y's kinds; True = knight)
STATEMENTS: dict[str, tuple[str, Callable[[bool, bool], bool]]] = {
    "knight": ("{x} is a knight", lambda x, y: x),
    "knave": ("{x} is a knave", lambda x, y: not x),
    "both_knights": ("{x} and {y} are both knights", lambda x, y: x and y),
    "both_knaves": ("{x} and {y} are both knaves", lambda x, y: not x and not y),
    "or_knave": ("{x} or {y} is a knave", lambda x, y: not x or not y),
    "or_knight": ("{x} or {y} is a knight", lambda x, y: x or y),
    "same": ("{x} and {y} are of the same kind", lambda x, y: x == y),
    "different": ("{x} and {y} are of different kinds", lambda x, y: x != y),
    "iff": ("{x} is a knave if and only if {y} is a knight", lambda x, y: (not x) == y),
    "implies": ("if {x} is a knight then {y} is a knave", lambda x, y: not x or not y),
}


def _consistent(statements: list[tuple[str, int, int]], kinds: tuple[bool, ...]) -> bool:
    """Knights say true statements, knaves false ones: kinds[i] == truth of person i's statement."""
    return all(kinds[i] == STATEMENTS[k][1](kinds[x], kinds[y]) for i, (k, x, y) in enumerate(statements))


def knights_knaves(n: int, *, num_people: int = 3, seed: int = 0) -> list[Problem]:
    """`n` knights-and-knaves puzzles with `num_people` (2..6) inhabitants, one statement each.

    Statements are drawn from `STATEMENTS` about two distinct people (possibly the speaker)
    and rejected until exactly one of the 2^N knight/knave assignments is consistent.
    answer: "Alice is a knight, Bob is a knave, ..." in speaking order.
    meta: `names`, `solution` (list of bools, True = knight), `statements` ([kind, x, y] per speaker).
    level = num_people.
    """
    _check_n(n)
    if not 2 <= num_people <= 6:
        raise ValueError(f"num_people must be in 2..6, got {num_people!r}")
    rng, problems = random.Random(seed), []
    for _ in range(n):
        names = rng.sample(_NAMES, num_people)
        for _attempt in range(_MAX_ATTEMPTS):
            statements = [(rng.choice(sorted(STATEMENTS)), *rng.sample(range(num_people), 2)) for _ in names]
            solutions = [s for s in itertools.product((True, False), repeat=num_people) if _consistent(statements, s)]
            if len(solutions) == 1:
                break
        else:
            raise RuntimeError(f"no unique knights-and-knaves puzzle after {_MAX_ATTEMPTS} attempts")
        solution = list(solutions[0])
        texts = [STATEMENTS[k][0].format(x=names[x], y=names[y]) for k, x, y in statements]
        said = [f'{name} says: "{text[0].upper() + text[1:]}."' for name, text in zip(names, texts)]
        prompt = (
            "On an island every inhabitant is either a knight, who always tells the truth, "
            f"or a knave, who always lies. You meet {num_people} inhabitants: {', '.join(names)}. "
            + " ".join(said)
            + ' Who is a knight and who is a knave? Answer in the form "<name> is a knight, <name> is a knave, ...".'
        )
        answer = ", ".join(f"{name} is a {'knight' if k else 'knave'}" for name, k in zip(names, solution))
        meta = {"names": names, "solution": solution, "statements": [list(s) for s in statements]}
        problems.append(Problem(prompt, answer, "knights_knaves", num_people, meta))
    return problems


# ---------------------------------------------------------------- local files (GSM8K, MATH, or any prompt/answer table)

# format -> (default prompt column, default answer column); the format is also the sample's ``task``, which picks the
# default verifier (text_reasoning.rewards.TaskReward): gsm8k -> the last number, math and plain -> math-verify.
LOCAL_FORMATS: dict[str, tuple[str, str]] = {
    "gsm8k": ("question", "answer"),  # answer: a worked solution ending "#### 72"
    "math": ("problem", "solution"),  # solution: a worked solution with the final answer in \boxed{...}
    "plain": ("prompt", "answer"),  # answer: the final answer itself ("72", "\frac{1}{2}")
}
def _level(value: Any) -> int:
    """A row's difficulty level: an int, or the digits of a label such as MATH's "Level 3"; 0 if none."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    digits = "".join(c for c in str(value or "") if c.isdigit())[:9]
    return int(digits) if digits else 0


def local_problems(path: str | Path, format: str = "gsm8k", prompt_column: str | None = None,
                   answer_column: str | None = None) -> list[Problem]:
    """Every row of a local file (:func:`read_rows`) as a ``Problem`` in file order: the prompt from
    ``prompt_column``, the reference answer read from ``answer_column`` as ``format`` says (``LOCAL_FORMATS``:
    "gsm8k" the text after the last ``####`` with commas removed, "math" the last ``\\boxed{...}``, "plain" the value
    itself), ``task = format``, ``level`` from a ``level`` column if any. A missing column, an empty prompt or a
    solution without its final answer is a one-line ValueError naming the file, the row and the argument."""
    from common.rewards.math import extract_boxed, gsm8k_answer

    if format not in LOCAL_FORMATS:
        raise ValueError(f"format must be one of {sorted(LOCAL_FORMATS)}, got {format!r}")
    prompt_column = prompt_column or LOCAL_FORMATS[format][0]
    answer_column = answer_column or LOCAL_FORMATS[format][1]
    rows = read_rows(path)
    for arg, column in (("prompt_column", prompt_column), ("answer_column", answer_column)):
        if column not in rows[0]:
            raise ValueError(f"{path} has no column {column!r} ({arg}; format {format!r}); its columns are "
                             f"{sorted(rows[0])}")
    problems = []
    for number, row in enumerate(rows, 1):
        prompt, solution = row.get(prompt_column), row.get(answer_column)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path} row {number}: prompt_column {prompt_column!r} is {prompt!r:.60}, expected text")
        if solution is None or isinstance(solution, (dict, list)):
            raise ValueError(f"{path} row {number}: answer_column {answer_column!r} is {solution!r:.60}, expected "
                             "text or a number")
        solution = str(solution)
        if format == "gsm8k":
            answer = gsm8k_answer(solution) if "####" in solution else ""
            expected = "a solution ending '#### <answer>' (GSM8K)"
        elif format == "math":
            answer = extract_boxed(solution) or ""
            expected = "a solution with its answer in \\boxed{...} (MATH)"
        else:
            answer, expected = solution.strip(), "the final answer"
        if not answer:
            raise ValueError(f"{path} row {number}: answer_column {answer_column!r} holds no final answer, expected "
                             f"{expected}: {solution[-80:]!r}")
        problems.append(Problem(prompt, answer, format, _level(row.get("level"))))
    return problems
