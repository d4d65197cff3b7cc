import re
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.rewards.base import RewardFunction
from text_reasoning.rewards import _EXPRESSION_LINE, CountdownReward, KnightsKnavesReward, TaskReward, countdown_expression, last_tagged
from text_reasoning.tasks import arithmetic, countdown, knights_knaves

COUNTDOWN = {"task": "countdown", "answer": "(8 - 7) * 3", "numbers": [3, 7, 8], "target": 3}
KNIGHTS = {"task": "knights_knaves", "answer": "", "names": ["Alice", "Bob", "Carol"], "solution": [True, False, True]}
HOSTILE = [
    "<answer>__import__('os').system('x')</answer>",
    "<answer>9**9**9</answer>",
    "<answer>" + "(" * 10_000 + "3" + ")" * 10_000 + "</answer>",
    "<answer>1/0</answer>",
    "3 * 7 - 8 " * 100_000,  # 1 MB on one line: longer than safe_eval's 200 characters
    "<answer>" * 150_000,  # 1.2 MB of unclosed tags
    "1" * 2**20 + "=",  # 1 MB line of digits that is not an expression (a backtracking line regex: 0.7 s per 10 kB)
    "<answer><think>" * 70_000 + "</answer>" * 10,  # nested, mostly unclosed
    "(" * 2**20,
]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("think... <answer>(8 - 7) * 3</answer>", "(8 - 7) * 3"),
        ("<answer>1</answer> no, <answer> 8 - 7 </answer>", "8 - 7"),  # last tag, stripped
        ("Try 8 - 7 = 1.\n(8 - 7) * 3\nDone.", "(8 - 7) * 3"),  # last '='-free arithmetic line
        ("8 - 7 = 1", None),
        ("nothing", None),
    ],
)
def test_countdown_expression(completion: str, expected: str | None) -> None:
    assert countdown_expression(completion) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<answer>(8 - 7) * 3</answer>", 1.0),  # 1 * 3 = 3
        ("<answer>3 * 7 / 7 * 8 / 8</answer>", 0.1),  # = 3 but uses 7 and 8 twice
        ("<answer>3 / (8 - 7)</answer>", 1.0),  # 3 / 1 = 3
        ("<answer>8 - 7 + 3</answer>", 0.1),  # 4, valid arithmetic: format only
        ("<answer>3</answer>", 0.1),  # = 3, but 7 and 8 unused
        ("<answer>3.0 * (8 - 7)</answer>", 0.1),  # float literal
        ("<answer>(8 - 7) ** 3</answer>", 0.0),  # not whitelisted
        ("the answer\n(8 - 7) * 3", 1.0),  # untagged last line
        ("no expression here", 0.0),
    ],
)
def test_countdown_reward(completion: str, expected: float) -> None:
    assert CountdownReward()([completion], [COUNTDOWN]).tolist() == [pytest.approx(expected)]


def test_countdown_reward_accepts_every_generated_answer() -> None:
    problems = countdown(10, num_numbers=4, seed=5)
    completions = [f"<answer>{p.answer}</answer>" for p in problems]
    out = CountdownReward(correct=2.0)(completions, [p.as_sample() for p in problems])
    assert out.dtype == torch.float32 and out.tolist() == [2.0] * 10


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Alice is a knight, Bob is a knave, Carol is a knight", 1.0),
        ("Suppose Alice is a knave... contradiction. So alice is a Knight, Bob is a knave and Carol is a knight.", 1.0),
        ("Alice is a knight, Bob is a knave", 0.0),  # Carol missing
        ("Alice is a knight, Bob is a knight, Carol is a knight", 0.0),
        ("<answer>Alice is a knight, Bob is a knave, Carol is a knight</answer> Alice is a knave", 1.0),  # tag wins
        ("Alice is not a knight, Bob is a knave, Carol is a knight", 0.0),  # no claim about Alice
        ("Alicea is a knight, Bob is a knave, Carol is a knight", 0.0),  # whole names only
    ],
)
def test_knights_knaves_reward(completion: str, expected: float) -> None:
    assert KnightsKnavesReward()([completion], [KNIGHTS]).tolist() == [expected]


def test_task_reward_dispatches_on_task() -> None:
    problems = arithmetic(2, seed=0) + countdown(2, seed=0) + knights_knaves(2, seed=0)
    samples = [p.as_sample() for p in problems]
    right = [f"<answer>{p.answer}</answer>" if p.task != "arithmetic" else f"So it is {p.answer}" for p in problems]
    assert isinstance(TaskReward(), RewardFunction)  # so YAML can name it where a RewardFunction is expected
    assert TaskReward()(right, samples).tolist() == [1.0] * 6
    assert TaskReward()(["no answer"] * 6, samples).tolist() == [0.0] * 6
    with pytest.raises(ValueError, match="sample\\['task'\\] must be one of") as info:
        TaskReward()(["1", "2"], [samples[0], {"task": "chess"}])
    assert "samples[1]" in "".join(info.value.__notes__)


@pytest.mark.parametrize("reward", [CountdownReward(), KnightsKnavesReward()], ids=lambda r: type(r).__name__)
def test_hostile_completions_score_zero_quickly(reward) -> None:
    sample = COUNTDOWN if isinstance(reward, CountdownReward) else KNIGHTS
    start = time.perf_counter()
    assert reward(HOSTILE, [sample] * len(HOSTILE)).tolist() == [0.0] * len(HOSTILE)
    assert time.perf_counter() - start < 1.0


_LAZY_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)  # the references the linear scans replace
_BACKTRACKING_LINE = re.compile(r"[0-9+\-*/×÷(). \t]*\d[0-9+\-*/×÷(). \t]*", re.ASCII)

_PIECES = ["<answer>", "</answer>", "<answer", "answer>", "1", "7 ", "+", "=", "\n", "(", "x", "٣"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=12))
def test_linear_parsers_equal_the_regexes_they_replace(parts):
    text = "".join(parts)
    found = _LAZY_ANSWER.findall(text)
    assert last_tagged(text) == (found[-1] if found else None)
    for line in text.splitlines():  # ASCII digits only: a lone non-ASCII digit is no longer an expression line
        assert bool(_EXPRESSION_LINE.fullmatch(line)) == bool(_BACKTRACKING_LINE.fullmatch(line))


def test_a_batch_of_hostile_completions_costs_milliseconds_each() -> None:
    """64 hostile completions (8 of each): the step's reward time stays bounded, per completion < 20 ms."""
    batch = HOSTILE * 8
    start = time.perf_counter()
    CountdownReward()(batch, [COUNTDOWN] * len(batch))
    elapsed = time.perf_counter() - start
    assert elapsed / len(batch) < 0.02, f"{elapsed:.2f} s for {len(batch)}"
