import itertools
from collections import Counter
from fractions import Fraction

import pytest

from common.rewards.expression import numbers_in, safe_eval
from text_reasoning.tasks import Problem, arithmetic, countdown, countdown_solutions, knights_knaves

# Independent semantics of the statement kinds, written from their English text (x, y: True = knight).
TRUTH = {
    "knight": lambda x, y: x,
    "knave": lambda x, y: not x,
    "both_knights": lambda x, y: x and y,
    "both_knaves": lambda x, y: (not x) and (not y),
    "or_knave": lambda x, y: (not x) or (not y),
    "or_knight": lambda x, y: x or y,
    "same": lambda x, y: x == y,
    "different": lambda x, y: x != y,
    "iff": lambda x, y: (not x) == y,
    "implies": lambda x, y: (not x) or (not y),
}


@pytest.mark.parametrize("generate", [arithmetic, countdown, knights_knaves])
def test_same_seed_same_problems_different_seed_different(generate) -> None:
    assert generate(5, seed=3) == generate(5, seed=3)
    assert generate(5, seed=3) != generate(5, seed=4)
    assert generate(0, seed=3) == []


def test_as_sample_merges_meta() -> None:
    problem = Problem("What is 1 + 2?", "3", "arithmetic", 1, {"operands": [1, 2], "op": "+"})
    expected = {"prompt": "What is 1 + 2?", "answer": "3", "task": "arithmetic", "level": 1}
    assert problem.as_sample() == expected | {"operands": [1, 2], "op": "+"}


@pytest.mark.parametrize(("digits", "ops"), [(1, "+"), (2, "+-*"), (3, "-"), (4, "*")])
def test_arithmetic(digits: int, ops: str) -> None:
    problems = arithmetic(50, digits=digits, ops=ops, seed=0)
    assert len({p.prompt for p in problems}) == 50  # distinct: at least 10*10 problems exist
    for p in problems:
        a, op, b = p.prompt.removeprefix("What is ").removesuffix("?").split()
        assert len(a) == len(b) == digits and op in ops and p.level == digits and p.task == "arithmetic"
        assert int(p.answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def test_arithmetic_more_problems_than_exist() -> None:
    problems = arithmetic(150, digits=1, ops="+", seed=0)  # only 10*10 = 100 distinct
    assert len(problems) == 150 and len({p.prompt for p in problems}) <= 100


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"digits": 5}, "digits"), ({"ops": "/"}, "ops"), ({"ops": ""}, "ops")],
)
def test_arithmetic_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        arithmetic(3, **kwargs)


@pytest.mark.parametrize("num_numbers", [2, 3, 4])
def test_every_countdown_problem_is_solved_by_its_answer(num_numbers: int) -> None:
    for p in countdown(20, num_numbers=num_numbers, max_number=30, seed=1):
        numbers, target = p.meta["numbers"], p.meta["target"]
        assert len(numbers) == num_numbers and all(1 <= x <= 30 for x in numbers) and p.level == num_numbers
        assert Counter(numbers_in(p.answer)) == Counter(numbers)  # each number exactly once
        assert safe_eval(p.answer) == pytest.approx(target, abs=1e-9)
        assert str(target) in p.prompt and str(numbers) in p.prompt


def _brute_force_reachable(numbers: list[int]) -> set[Fraction]:
    """All values of expressions using every number once (rationals, any intermediate), by recursion."""
    if len(numbers) == 1:
        return {Fraction(numbers[0])}
    values = set()
    for r in range(1, len(numbers)):
        for left in itertools.combinations(range(len(numbers)), r):
            rest = [numbers[i] for i in range(len(numbers)) if i not in left]
            for a in _brute_force_reachable([numbers[i] for i in left]):
                for b in _brute_force_reachable(rest):
                    values |= {a + b, a - b, a * b} | ({a / b} if b else set())
    return values


def test_countdown_solutions_are_reachable_and_correct() -> None:
    numbers = [3, 7, 8]
    solutions = countdown_solutions(numbers)
    assert set(solutions) <= _brute_force_reachable(numbers)
    for value, expr in solutions.items():
        assert safe_eval(expr) == value and sorted(numbers_in(expr)) == numbers
    assert 3 * 7 + 8 in solutions and (8 - 7) * 3 in solutions  # 29 and 3
    assert set(countdown_solutions([6, 3])) == {9, 3, -3, 18, 2}  # 6+3, 6-3, 3-6, 6*3, 6/3 (3/6 is not an integer)


@pytest.mark.parametrize("num_people", [2, 3, 4, 6])
def test_every_knights_knaves_puzzle_has_exactly_one_consistent_assignment(num_people: int) -> None:
    for p in knights_knaves(15, num_people=num_people, seed=2):
        names, statements = p.meta["names"], p.meta["statements"]
        assert len(set(names)) == num_people == len(statements) == p.level

        def consistent(kinds: tuple[bool, ...]) -> bool:  # knights say true things, knaves false ones
            return all(kinds[i] == TRUTH[kind](kinds[x], kinds[y]) for i, (kind, x, y) in enumerate(statements))

        solutions = [kinds for kinds in itertools.product([True, False], repeat=num_people) if consistent(kinds)]
        assert solutions == [tuple(p.meta["solution"])]
        expected = ", ".join(f"{n} is a {'knight' if k else 'knave'}" for n, k in zip(names, solutions[0]))
        assert p.answer == expected
        assert all(f'{name} says: "' in p.prompt for name in names)


def test_knights_knaves_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_people"):
        knights_knaves(1, num_people=7)
    with pytest.raises(ValueError, match="num_numbers"):
        countdown(1, num_numbers=1)
    with pytest.raises(ValueError, match="n must be"):
        knights_knaves(-1)
