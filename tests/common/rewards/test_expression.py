import time

import pytest

from common.rewards.expression import numbers_in, safe_eval


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("1 + 2", 3.0),
        ("(3 + 5) * 2", 16.0),  # 8 * 2
        ("7 - 10", -3.0),
        ("-4 * -2", 8.0),
        ("10 / 4", 2.5),
        ("2 + 3 * 4", 14.0),  # precedence: 2 + 12
        ("((1 + 2)) * (3)", 9.0),
        ("1.5 * 2", 3.0),
        ("6 × 7 ÷ 2", 21.0),  # × and ÷ read as * and /: 42 / 2
        ("  12  ", 12.0),
    ],
)
def test_safe_eval_values(expr: str, expected: float) -> None:
    assert safe_eval(expr) == expected


HOSTILE = [
    "__import__('os').system('x')",
    "9**9**9",
    "2**10",
    "1/0",
    "(1 - 1) and 5",
    "7 // 2",
    "7 % 2",
    "abs(-3)",
    "x + 1",
    "1e5",
    "",
    "1 +",
    "()",
    "+3",  # unary plus is not whitelisted
    "[1, 2]",
    "(" * 10_000 + "1" + ")" * 10_000,
    "1" + " + 1" * 250_000,  # 1 MB
    "9" * 1_000_000,
]


@pytest.mark.parametrize("expr", HOSTILE, ids=lambda e: e[:20])
def test_safe_eval_rejects_hostile_input_quickly(expr: str) -> None:
    start = time.perf_counter()
    assert safe_eval(expr) is None
    numbers_in(expr)  # bounded the same way
    assert time.perf_counter() - start < 0.1


def test_safe_eval_bounds() -> None:
    assert safe_eval("999999 * 999999") == 999998000001.0  # 1e12 - 2e6 + 1 <= 1e12
    assert safe_eval("1000000 * 1000001") is None  # 1.000001e12 > max_abs
    assert safe_eval("1 + 2", max_len=4) is None  # 5 characters
    assert safe_eval("((((1))))", max_depth=3) is None  # 4 levels of brackets
    assert safe_eval("((((1))))", max_depth=4) == 1.0
    assert safe_eval("1-1-1-1-1", max_depth=3) is None  # left-nested tree of depth 4
    assert safe_eval("1/(2-2)") is None  # division by zero inside


def test_numbers_in() -> None:
    assert numbers_in("-3 + 12/4") == [3, 12, 4]
    assert numbers_in("(25 - 5) * 4") == [25, 5, 4]
    assert numbers_in("1.5 + 2") == [2]  # float literals are not integers
    assert numbers_in("2 ** 3") == [2, 3]  # parseable characters; safe_eval still rejects it
    assert numbers_in("__import__('os')") == []
    assert numbers_in("(" * 10_000 + "1" + ")" * 10_000) == []  # too long and too deep
