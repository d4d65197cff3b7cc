import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from common.rewards.math import (
    FormatReward,
    MathVerifyReward,
    NumericAnswerReward,
    extract_boxed,
    gsm8k_answer,
    last_number,
    math_verify_equal,
)

MEGABYTE = "7 " * 500_000
HOSTILE = [
    "__import__('os').system('x')",
    "\\boxed{9^{9^{9}}}",
    "9**9**9",
    "\\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}",
    "\\boxed{1/0}",
    "\\boxed{" * 200_000,  # 1.4 MB of unclosed boxes
    MEGABYTE,
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42.", "42"),
        ("It costs $1,234.50 in total", "1234.50"),
        ("from -3 to -7", "-7"),
        ("5-3", "3"),  # a '-' after a digit is subtraction, not a sign
        ("1,2,3", "3"),  # not a thousands separator
        ("x = 0.25, so", "0.25"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_last_number(text: str, expected: str | None) -> None:
    assert last_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # last box, nested braces
        ("\\boxed{ {a}{b} }", "{a}{b}"),
        ("\\boxed{unclosed", None),
        ("no box", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


def test_gsm8k_answer() -> None:
    assert gsm8k_answer("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7") == "7"
    assert gsm8k_answer("...\n#### 1,200") == "1200"
    with pytest.raises(ValueError, match="####"):
        gsm8k_answer("no marker")


@pytest.mark.parametrize(
    ("pred", "gold", "equal"),
    [
        ("\\frac{1}{2}", "0.5", True),
        ("1/2", "0.5", True),
        ("\\sqrt{2}", "2^{1/2}", True),
        ("x+1", "1+x", True),
        ("72", "72", True),
        ("72", "73", False),
        ("", "1", False),
    ],
)
def test_math_verify_equal(pred: str, gold: str, equal: bool) -> None:
    assert math_verify_equal(pred, gold) is equal


def test_math_verify_equal_enforces_timeout_in_main_thread() -> None:
    start = time.perf_counter()
    assert math_verify_equal("9^{9^{9}}", "5", timeout_s=0.3) is False  # sympy would run for minutes
    assert time.perf_counter() - start < 1.0
    assert math_verify_equal("\\frac{2}{4}", "0.5", timeout_s=0.3) is True  # the alarm is disarmed after a timeout


def test_math_verify_equal_in_a_thread_uses_a_worker_process() -> None:
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(math_verify_equal, "\\frac{1}{2}", "0.5").result() is True  # starts the worker
        start = time.perf_counter()
        assert pool.submit(math_verify_equal, "9^{9^{9}}", "5", 0.3).result() is False  # worker killed
        assert time.perf_counter() - start < 1.0


def test_math_verify_equal_rejects_bad_timeout() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        math_verify_equal("1", "1", timeout_s=0)


def test_numeric_answer_reward() -> None:
    completions = ["so the answer is 1,200.", "I think 1200.0", "it is 12", "no idea", "-5 apples"]
    samples = [{"answer": "1200"}] * 4 + [{"answer": "-5"}]
    reward = NumericAnswerReward(correct=1.0, wrong=-0.5)
    expected = torch.tensor([1.0, 1.0, -0.5, -0.5, 1.0])  # 1200.0 == 1200 as rationals
    torch.testing.assert_close(reward(completions, samples), expected, rtol=0, atol=0)


def test_math_verify_reward_prefers_boxed_answer() -> None:
    completions = ["half of 3 is \\boxed{\\frac{3}{2}} (not 7)", "1.5", "\\boxed{2} and then 1.5", ""]
    out = MathVerifyReward(timeout_s=2.0)(completions, [{"answer": "1.5"}] * 4)
    assert out.dtype == torch.float32 and out.shape == (4,)
    assert out.tolist() == [1.0, 1.0, 0.0, 0.0]  # third: the box (2) wins over the last number


def test_format_reward() -> None:
    completions = ["x \\boxed{3} y", "\\boxed{}", "3", "\\boxed{1}" + " " * 20_000, "\\boxed{1}" + " " * 9_000]
    out = FormatReward()(completions, [{}] * 5)
    assert out.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]  # 4th: the box lies outside the last 10,000 characters
    assert FormatReward(pattern=r"^<think>", reward=0.5)(["<think>a", "a<think>"], [{}, {}]).tolist() == [0.5, 0.0]
    with pytest.raises(ValueError, match="pattern"):
        FormatReward(pattern="(")


@pytest.mark.parametrize(
    "reward", [NumericAnswerReward(), MathVerifyReward(timeout_s=0.3), FormatReward()], ids=lambda r: type(r).__name__
)
def test_hostile_completions_score_zero_quickly(reward) -> None:
    start = time.perf_counter()
    out = reward(HOSTILE, [{"answer": "5"}] * len(HOSTILE))
    if isinstance(reward, FormatReward):  # boxes with content are the format, whatever is inside
        assert out.tolist() == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # 4th: its box is cut off (> 10,000 chars)
    else:
        assert out.tolist() == [0.0] * len(HOSTILE)
    assert time.perf_counter() - start < 2.0  # at most one 0.3 s math-verify timeout, the rest are fast


def test_bad_batches_raise_naming_the_problem() -> None:
    with pytest.raises(ValueError, match="same length"):
        NumericAnswerReward()(["1", "2"], [{"answer": "1"}])
    with pytest.raises(ValueError, match="must be a number") as info:
        NumericAnswerReward()(["1", "2"], [{"answer": "1"}, {"answer": "seven"}])
    assert "samples[1]" in "".join(info.value.__notes__)
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifyReward(timeout_s=-1)
