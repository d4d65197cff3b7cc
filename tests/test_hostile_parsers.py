"""Model output is hostile input: every function that parses a completion (rewards, answer extractors, the retrieval
parser, SDPO's teacher contexts, the tool-call parsers and the environments' answer readers) bounds its input before
any regex or parse, so long (1 MB), deeply nested (100k brackets or tags) and unclosed completions are refused (None,
a parse error, or no reward beyond format credit) within a bound far below a second, and never raise.

Each parser runs on every hostile text below; the bound is per call. math-verify alone may take its own deadline
(``timeout_s``, a wall-clock alarm), which the bound adds for it. Parsers with their own hostile tests beside them:
tests/common/rewards/test_math.py, tests/text_reasoning/test_rewards.py, tests/text_reasoning/test_self_distill.py,
tests/common/rollout/test_env.py, tests/common/rewards/test_expression.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from common.rewards import math as math_rewards
from common.rewards.base import call_with_timeout
from common.rewards.expression import numbers_in, safe_eval
from common.rewards.math import _KILL_GRACE_S
from common.rollout.env import ParseError, parse_json_tool_call, parse_tool_call
from diffusion.dllm.rewards import ChainSumReward, chain_sum_answer
from retrieval import rewards as retrieval
from text_reasoning import rewards as task_rewards
from text_reasoning.envs.calculator import Calculator, final_answer
from text_reasoning.envs.grid import GridWorld, last_move
from text_reasoning.self_distill import MAX_DEMONSTRATION_CHARS, strip_thinking, teacher_contexts
from text_reasoning.tasks import arithmetic, countdown, knights_knaves

BOUND_S = 0.25  # per call; the slowest parser takes ~30 ms on a 2-core machine (FormatReward's regex on 10 kB)
MATH_VERIFY_TIMEOUT_S = 0.2
MB = 2**20
N = 100_000  # nesting depth


def _nest(open_: str, close: str, middle: str = "1") -> str:
    return open_ * N + middle + close * N


HOSTILE = {  # no text holds a correct answer: every gold answer below is 5 (or a puzzle's full solution)
    "long digits": "7" * MB,
    "long words": "x " * (MB // 2),
    "long arithmetic line": "3 * 7 - 8 " * (MB // 10),
    "long lines": "1+\n" * (MB // 3),
    "long whitespace": "Alice" + " " * MB + "is a knight",
    "long unicode digits": "\u0663" * MB,  # Arabic-Indic three: \d matches it
    "long NULs": "\x00" * MB,
    "nested braces": _nest("{", "}"),
    "nested parentheses": _nest("(", ")"),
    "nested brackets": _nest("[", "]"),
    "nested boxes": _nest("\\boxed{", "}"),
    "nested fractions": _nest("\\frac{", "}{2}"),
    "nested dollars": _nest("$", "$"),
    "nested answer tags": _nest("<answer>", "</answer>"),
    "nested think tags": _nest("<think>", "</think>"),
    "nested tool tags": _nest("<tool>", "</tool>", "calc: 1"),
    "nested tool_call tags": _nest('<tool_call>{"name": "calc", "arguments": ', "}</tool_call>", '{"e": "1"}'),
    "nested JSON": "<tool_call>" + _nest("[", "]") + "</tool_call>",
    "nested slate and rank": _nest("<slate>", "</slate>") + _nest("<rank>", "</rank>"),
    "unclosed boxes": "\\boxed{" * (MB // 7),
    "unclosed answer tags": "<answer>" * (MB // 8),
    "unclosed think tag": "<think>" + "7" * MB,
    "unclosed tool call": "<tool>calc: " + "9" * MB,
    "unclosed JSON tool call": "<tool_call>" + "{" * MB,
    "unclosed slate": "<slate> 1 2 " * (MB // 12),
    "unclosed tags mixed": "<answer><think>" * (MB // 15) + "</answer>" * 10,
    "many hashes": "#" * MB,
}

ARITHMETIC = {"prompt": "What is 2 + 3?", "answer": "5", "task": "arithmetic", "level": 1}
COUNTDOWN = countdown(1, seed=0)[0].as_sample()
KNIGHTS = knights_knaves(1, num_people=3, seed=0)[0].as_sample()
TASKS = [ARITHMETIC, COUNTDOWN, KNIGHTS, {**ARITHMETIC, "task": "gsm8k"}, {**ARITHMETIC, "task": "math"},
         {**ARITHMETIC, "task": "plain"}]
RELEVANCE = {"relevance": [1.0, 0.0, 0.5, 0.0, 1.0, 0.0, 0.0, 0.0], "max_slate": 4, "rank_k": 2}
assert arithmetic(1, seed=0)  # the generators import cleanly


def _calculator(protocol: str) -> Calculator:
    env = Calculator(protocol=protocol)
    env.reset({"answer": "5", "prompt": "What is 2 + 3?"})
    return env


def _grid() -> GridWorld:
    env = GridWorld()
    env.reset({"size": 4, "start": [0, 0], "goal": [3, 3]})
    return env


def _text_or_none(limit: int) -> Callable[[Any], bool]:
    return lambda out: out is None or (isinstance(out, str) and len(out) <= limit)


def _rewards_at_most(value: float) -> Callable[[Any], bool]:
    return lambda out: bool(((out <= value) & (out == out)).all())  # no correctness credit, never NaN


MATH_VERIFY = math_rewards.MathVerifyReward(timeout_s=MATH_VERIFY_TIMEOUT_S)

# name -> (call on one completion, is the output a refusal?, extra seconds the call may take)
PARSERS: dict[str, tuple[Callable[[str], Any], Callable[[Any], bool], float]] = {
    "math.last_number": (math_rewards.last_number, _text_or_none(math_rewards.MAX_CHARS), 0.0),
    "math.extract_boxed": (math_rewards.extract_boxed, _text_or_none(math_rewards.MAX_CHARS), 0.0),
    "math.NumericAnswerReward": (lambda t: math_rewards.NumericAnswerReward()([t], [ARITHMETIC]), _rewards_at_most(0.0), 0.0),
    "math.MathVerifyReward": (lambda t: MATH_VERIFY([t], [ARITHMETIC]), _rewards_at_most(0.0), MATH_VERIFY_TIMEOUT_S + _KILL_GRACE_S),
    "math.MathVerifyReward (worker)": (lambda t: call_with_timeout(MATH_VERIFY, [t], [ARITHMETIC], timeout_s=60.0),
                                       _rewards_at_most(0.0), MATH_VERIFY_TIMEOUT_S + _KILL_GRACE_S),  # another thread
    "math.math_verify_equal": (lambda t: math_rewards.math_verify_equal(t, "5", MATH_VERIFY_TIMEOUT_S),
                               lambda out: out is False, MATH_VERIFY_TIMEOUT_S + _KILL_GRACE_S),
    "math.FormatReward": (lambda t: math_rewards.FormatReward()([t], [{}]), _rewards_at_most(1.0), 0.0),  # format only
    "text.last_tagged": (task_rewards.last_tagged, lambda out: out is None or isinstance(out, str), 0.0),
    "text.countdown_expression": (task_rewards.countdown_expression, _text_or_none(math_rewards.MAX_CHARS), 0.0),
    "text.CountdownReward": (lambda t: task_rewards.CountdownReward()([t], [COUNTDOWN]), _rewards_at_most(0.1), 0.0),
    "text.KnightsKnavesReward": (lambda t: task_rewards.KnightsKnavesReward()([t], [KNIGHTS]), _rewards_at_most(0.0), 0.0),
    "text.TaskReward (every task)": (lambda t: task_rewards.TaskReward()([t] * len(TASKS), TASKS),
                                     _rewards_at_most(0.1), (MATH_VERIFY_TIMEOUT_S + _KILL_GRACE_S) * 3),
    "expression.safe_eval": (safe_eval, lambda out: out is None, 0.0),
    "expression.numbers_in": (numbers_in, lambda out: out == [], 0.0),
    "retrieval.parse": (lambda t: retrieval.parse(t, 8, 4, 2), lambda out: not out.ok, 0.0),
    "retrieval.SlateCoverage": (lambda t: retrieval.SlateCoverage()([t], [RELEVANCE]), _rewards_at_most(-1.0), 0.0),
    "retrieval.RankingNDCG": (lambda t: retrieval.RankingNDCG(k=2)([t], [RELEVANCE]), _rewards_at_most(-1.0), 0.0),
    "retrieval.slate_end": (retrieval.slate_end, lambda out: out is None or isinstance(out, int), 0.0),
    "sdpo.strip_thinking": (strip_thinking, lambda out: isinstance(out, str), 0.0),
    "sdpo.teacher_contexts": (
        lambda t: teacher_contexts(["p", "p"], ["w", t], [False, True], [0, 0]),
        lambda out: out[1] is None and len(out[0]) <= MAX_DEMONSTRATION_CHARS + 100, 0.0),
    "env.parse_tool_call": (parse_tool_call, lambda out: out is None or isinstance(out, ParseError), 0.0),
    "env.parse_json_tool_call": (parse_json_tool_call, lambda out: out is None or isinstance(out, ParseError), 0.0),
    "calculator.final_answer": (final_answer, lambda out: out is None, 0.0),
    "calculator.step (tag)": (lambda t: _calculator("tag").step(t), lambda out: out.reward == 0.0 and len(out.observation) < 200, 0.0),
    "calculator.step (json)": (lambda t: _calculator("json").step(t), lambda out: out.reward == 0.0 and len(out.observation) < 200, 0.0),
    "grid.last_move": (last_move, lambda out: out is None or out in "udlr", 0.0),
    "grid.step": (lambda t: _grid().step(t), lambda out: out.reward == 0.0, 0.0),
    "dllm.chain_sum_answer": (chain_sum_answer, _text_or_none(1), 0.0),
    "dllm.ChainSumReward": (lambda t: ChainSumReward()([t], [{"answer": "5"}]), _rewards_at_most(0.1), 0.0),
}


@pytest.mark.parametrize("name", PARSERS)
def test_hostile_completions_are_refused_quickly_and_never_raise(name):
    parse, refused, deadline_s = PARSERS[name]
    # math-verify is imported (~1 s), in this process and in the worker that other threads use, before timing
    assert math_rewards.math_verify_equal("1", "1") and call_with_timeout(math_rewards.math_verify_equal, "1", "1", timeout_s=60.0)
    slow, wrong = [], []
    worst = 0.0
    for kind, text in HOSTILE.items():
        start = time.perf_counter()
        out = parse(text)  # an exception fails the test: a parser never raises on model output
        elapsed = time.perf_counter() - start
        worst = max(worst, elapsed)
        if elapsed > BOUND_S + deadline_s:
            slow.append(f"{kind}: {elapsed:.3f} s")
        if not refused(out):
            wrong.append(f"{kind}: {out!r:.80}")
    print(f"{name}: slowest {worst * 1000:.1f} ms over {len(HOSTILE)} hostile completions")
    assert not slow, f"{name} took longer than {BOUND_S + deadline_s} s on {slow}"
    assert not wrong, f"{name} did not refuse {wrong}"
