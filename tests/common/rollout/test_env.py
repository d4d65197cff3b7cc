"""common/rollout/env.py: the bounded tool-call parser, tools that are the environment's own functions, bounded
environment steps (a hanging or raising environment is an outcome, not a crash), and hostile model output: tool
calls with megabyte strings, ``__import__``, ``9**9**9``, deep nesting and unclosed tags are refused in bounded
time and never evaluated."""

from __future__ import annotations

import time

import pytest

from common.rollout.env import (EpisodeLimits, EpisodeReturn, ParseError, Step, ToolCall, call_tool,
                                parse_json_tool_call, parse_tool_call, run_step)
from text_reasoning.envs.calculator import Calculator

TASK = {"prompt": "What is 12 + 7 * 2?", "answer": "26"}


@pytest.mark.parametrize("action, expected", [
    ("<tool>calc: 12+7</tool>", ToolCall("calc", "12+7")),
    ("I will add. <tool> CALC :  12 + 7 </tool> then", ToolCall("calc", "12 + 7")),
    ("<tool>calc: 1+1</tool><tool>calc: 2*3</tool>", ToolCall("calc", "2*3")),  # the last call counts
    ("no call here, <answer>19</answer>", None),
    ("<tool>calc: 12+7", ParseError("unclosed <tool> tag")),
    ("<tool>12+7</tool>", ParseError("a tool call is <tool>name: argument</tool>")),
    ("<tool>os.system: ls</tool>", ParseError("bad tool name")),
    ("<tool>: 1</tool>", ParseError("bad tool name")),
])
def test_parse_tool_call(action, expected):
    assert parse_tool_call(action) == expected


def J(body: str) -> str:
    return f"<tool_call>{body}</tool_call>"


@pytest.mark.parametrize("action, expected", [
    (J('{"name": "calc", "arguments": {"expression": "12+7"}}'), ToolCall("calc", "12+7")),
    ("ok " + J('{"name": "calc", "arguments": {"x": 3}}') + J(' {"name":"CALC","arguments":{"e":"2*3"}} '),
     ToolCall("calc", "2*3")),
    ("<answer>19</answer>", None),
    ('<tool_call>{"name": "calc", "arguments": {"expression": "1"}}', ParseError("unclosed <tool_call> tag")),
    (J('{"name": "calc", "arguments": {"expression": "1"}'), ParseError("the tool call is not valid JSON")),
    (J('["calc", "1"]'), ParseError('a tool call is {"name": "...", "arguments": {...}}')),
    (J('{"name": "os.system", "arguments": {"c": "ls"}}'), ParseError("bad tool name")),
    (J('{"name": "calc", "arguments": {"a": "1", "b": "2"}}'), ParseError("the tool takes exactly one argument")),
    (J('{"name": "calc", "arguments": {"a": {"b": 1}}}'), ParseError("the argument must be a string or a number")),
    (J('{"name": "calc", "arguments": {"a": "' + "1" * 600 + '"}}'), ParseError("tool call longer than 512 characters")),
    (J("[" * 250 + "]" * 250), ParseError('a tool call is {"name": "...", "arguments": {...}}')),
])
def test_parse_json_tool_call(action, expected):
    assert parse_json_tool_call(action) == expected


def test_calculator_json_protocol_by_hand():
    env = Calculator(protocol="json")
    assert env.stop_strings == ("</tool_call>",) and "<tool_call>" in env.reset(TASK)
    assert env.step(J('{"name": "calc", "arguments": {"expression": "7 * 2"}}')) == Step("<result>14</result>", 0.0, False)
    assert env.step(J('{"name": "calc", "arguments": {"expression": "__import__(\'os\')"}}')) == \
        Step("<result>error: not arithmetic</result>", 0.0, False)
    assert env.step(J('{"name": "calc", "arguments": {"expression": 1e999}}')) == \
        Step("<result>error: not arithmetic</result>", 0.0, False)  # inf: refused by safe_eval
    assert env.step("<answer>26</answer>") == Step("", 1.0, True)


def test_tools_are_the_environments_own_functions():
    env = Calculator()
    assert call_tool(env.tools, ToolCall("calc", "12 + 7")) == "19"
    assert call_tool(env.tools, ToolCall("calc", "1 / 3")) == "0.333333"
    assert call_tool(env.tools, ToolCall("python", "1")).startswith("error: unknown tool 'python'")
    assert call_tool({"boom": lambda a: 1 / 0}, ToolCall("boom", "")) == "error: ZeroDivisionError"
    assert len(call_tool({"big": lambda a: "x" * 10**6}, ToolCall("big", ""), max_result_chars=50)) == 50


def test_calculator_episode_by_hand():
    """reset -> tool call -> result -> final answer; reward only at the end (outcome reward)."""
    env = Calculator(max_tool_calls=1)
    assert env.reset(TASK).endswith("What is 12 + 7 * 2?")
    assert env.step("<tool>calc: 7 * 2</tool>") == Step("<result>14</result>", 0.0, False)
    assert env.step("<tool>calc: 12 + 14</tool>") == Step("<result>error: no tool calls left</result>", 0.0, False)
    assert env.step("<tool>calc: 1") == Step("<result>error: unclosed <tool> tag</result>", 0.0, False, False)  # invalid
    assert env.step("so <answer>26</answer>") == Step("", 1.0, True)
    env.reset(TASK)
    assert env.step("<answer>25</answer>") == Step("", 0.0, True)
    assert env.step("26") == Step("", 0.0, True)  # no <answer> tag: no answer


HOSTILE = {
    "megabyte argument": "<tool>calc: " + "1+" * 500_000 + "1</tool>",
    "megabyte action, call at the start": "<tool>calc: 1+1</tool>" + "x" * 10**6,
    "megabyte unclosed": "<tool>calc: " + "9" * 10**6,
    "megabyte of opening tags": "<tool>" * 200_000,
    "import": "<tool>calc: __import__('os').system('touch /tmp/advlab_pwned')</tool>",
    "power tower": "<tool>calc: 9**9**9</tool>",
    "deep nesting": "<tool>calc: " + "(" * 50 + "1" + ")" * 50 + "</tool>",
    "very deep nesting": "<tool>calc: " + "(" * 100_000 + "1" + ")" * 100_000 + "</tool>",
    "huge literal": "<tool>calc: 99999999999999999999 * 99999999999999999999</tool>",
    "unclosed and nested tags": "<tool><tool><tool>calc: 1</tool",
    "lambda": "<tool>calc: (lambda: 1)()</tool>",
    "attribute": "<tool>calc: ().__class__</tool>",
}


@pytest.mark.parametrize("protocol", ["tag", "json"])
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_tool_calls_are_refused_in_bounded_time_and_never_evaluated(name, protocol):
    action = HOSTILE[name]
    if protocol == "json":  # the same payloads in the function-calling format
        action = action.replace("<tool>calc: ", '<tool_call>{"name": "calc", "arguments": {"expression": "')
        action = action.replace("</tool>", '"}}</tool_call>').replace("<tool>", "<tool_call>")
    env = Calculator(protocol=protocol)
    env.reset(TASK)
    start = time.perf_counter()
    parsed = (parse_tool_call if protocol == "tag" else parse_json_tool_call)(action)
    step = env.step(action)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, elapsed  # bounded: the action is cut to MAX_ACTION_CHARS before any parsing
    assert not __import__("os").path.exists("/tmp/advlab_pwned")
    if name in ("megabyte action, call at the start", "megabyte unclosed"):  # no tag in the last MAX_ACTION_CHARS
        assert parsed is None and step == Step("", 0.0, True)  # characters: a final answer without an answer
        return
    assert step.reward == 0.0 and not step.done and step.observation.startswith("<result>error")
    assert len(step.observation) <= 64
    assert isinstance(parsed, ParseError) or parsed.name == "calc", parsed


def test_hostile_final_answers_are_not_evaluated():
    env = Calculator()
    env.reset(TASK)
    for action in ("<answer>__import__('os')</answer>", "<answer>13*2</answer>", "<answer>" + "2" * 10**6 + "</answer>",
                   "<answer>26" + " " * 10**6, "<answer>1e400</answer>"):
        start = time.perf_counter()
        assert env.step(action) == Step("", 0.0, True)
        assert time.perf_counter() - start < 0.5


class Hangs:
    def step(self, action):
        time.sleep(5)


def test_a_hanging_or_raising_step_is_an_outcome_with_a_log_line(caplog):
    start = time.perf_counter()
    out = run_step(Hangs().step, "x", 0.2, "step 0 of task 't'")
    assert out == (None, "timeout") and time.perf_counter() - start < 2
    out = run_step(lambda a: 1 / 0, "x", 0.2, "step 1 of task 't'")
    assert out == (None, "env_error")
    assert "step 0 of task 't' timed out after 0.2 s" in caplog.text
    assert "step 1 of task 't' raised ZeroDivisionError" in caplog.text
    assert run_step(lambda a: a + "!", "x", 0.2, "ok") == ("x!", None)


def test_episode_limits_and_return_reward_name_bad_arguments():
    with pytest.raises(ValueError, match="max_turns must be a positive integer"):
        EpisodeLimits(max_turns=0)
    with pytest.raises(ValueError, match="step_timeout_s must be > 0"):
        EpisodeLimits(step_timeout_s=0)
    with pytest.raises(ValueError, match=r"samples \[1\] have no 'episode_return'"):
        EpisodeReturn()(["a", "b"], [{"episode_return": 1.0}, {}])
    assert EpisodeReturn()(["a"], [{"episode_return": 0.5}]).tolist() == [0.5]
