"""A calculator tool for multi-step arithmetic: the agent may call ``<tool>calc: 12*7</tool>`` (or, with
``protocol="json"``, the chat templates' function-calling format
``<tool_call>{"name": "calc", "arguments": {"expression": "12*7"}}</tool_call>``) and gets ``<result>84</result>``,
as often as it likes up to ``max_tool_calls``, and ends the episode with a turn that calls no tool, holding its
answer in ``<answer>...</answer>``. Outcome reward: ``correct_reward`` for the right answer, 0
otherwise (the reward comes only at the end, so episode-level GRPO sees it as the episode's return).

The tool evaluates with ``common.rewards.expression.safe_eval`` (a whitelisted ``ast`` walk over numbers,
+ - * / and parentheses, bounded length, depth and magnitude): never ``eval``. Every text the model writes is cut
and parsed by bounded string operations (``common.rollout.env.parse_tool_call``).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping
from typing import Any, Literal

from common.rewards.expression import safe_eval
from common.rollout.env import (JSON_CLOSE, MAX_ACTION_CHARS, TOOL_CLOSE, Environment, ParseError, Step, call_tool,
                                parse_json_tool_call, parse_tool_call)
from text_reasoning.data import TaskSource
from text_reasoning.tasks import Problem

_ANSWER = re.compile(r"<answer>([^<]{0,64})</answer>")
_NUMBER = re.compile(r"-?\d{1,15}(?:\.\d{1,9})?")

INSTRUCTION = ("You have a calculator. To use it write <tool>calc: EXPRESSION</tool> and wait for "
               "<result>VALUE</result>. When you know the answer, write it as <answer>NUMBER</answer>.\n")


# The function's JSON schema (OpenAI / transformers ``get_json_schema`` format). SmolLM2's chat template renders no
# ``tools`` (it has no tool section and treats every role alike), so the schema goes into the instruction in the
# layout of templates that do (Qwen2.5's <tools> block); the result comes back as a ``tool`` message when the agent
# renders observations through the template (``EpisodeLimits.observation_role: tool``).
CALC_SCHEMA = {"type": "function", "function": {
    "name": "calc", "description": "Evaluate an arithmetic expression (numbers, + - * / and parentheses).",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. 37 * 12"}},
                   "required": ["expression"]}}}
INSTRUCTION_JSON = ('You have a calculator function:\n<tools>\n' + json.dumps(CALC_SCHEMA) + '\n</tools>\n'
                    'To call it write <tool_call>{"name": "calc", "arguments": {"expression": "EXPRESSION"}}</tool_call> '
                    'and wait for <result>VALUE</result>. When you know the answer, write it as <answer>NUMBER</answer>.\n')


def format_number(value: float) -> str:
    """An integer when the value is one (``19``), else at most 6 decimals (``0.333333``)."""
    return str(int(value)) if float(value).is_integer() else f"{value:.6f}".rstrip("0")


def final_answer(action: str) -> float | None:
    """The number in the last ``<answer>...</answer>`` of an action (its last MAX_ACTION_CHARS characters), else
    None. Only short digit strings are converted (no eval)."""
    tagged = _ANSWER.findall(action[-MAX_ACTION_CHARS:])
    if not tagged:
        return None
    text = tagged[-1].strip().replace(",", "")
    return float(text) if _NUMBER.fullmatch(text) else None


class Calculator(Environment):
    """Multi-step arithmetic with a calculator tool (module docstring).

    Args:
        max_tool_calls: tool calls per episode; later calls get an error result.
        max_expression_chars: longest expression the tool accepts (longer calls are refused unparsed).
        correct_reward: the outcome reward of a right final answer.
        instruction: text placed before the task's question in the first observation (default: the protocol's).
        protocol: "tag" (``<tool>calc: EXPR</tool>``) or "json" (``<tool_call>{"name": "calc", "arguments":
            {"expression": "EXPR"}}</tool_call>``).
    """

    def __init__(self, max_tool_calls: int = 4, max_expression_chars: int = 64, correct_reward: float = 1.0,
                 instruction: str | None = None, protocol: Literal["tag", "json"] = "tag"):
        if max_tool_calls < 0 or max_expression_chars < 1:
            raise ValueError(f"max_tool_calls must be >= 0 and max_expression_chars >= 1, got {max_tool_calls}, "
                             f"{max_expression_chars}")
        if protocol not in ("tag", "json"):
            raise ValueError(f"protocol must be 'tag' or 'json', got {protocol!r}")
        self.protocol = protocol
        # a turn that calls the tool ends at the closing tag, and the result comes back
        self.stop_strings = (TOOL_CLOSE,) if protocol == "tag" else (JSON_CLOSE,)
        instruction = instruction if instruction is not None else (INSTRUCTION if protocol == "tag" else INSTRUCTION_JSON)
        self.max_tool_calls, self.max_expression_chars = max_tool_calls, max_expression_chars
        self.correct_reward, self.instruction = correct_reward, instruction
        self.answer: float | None = None
        self.calls = 0
        self.tools = {"calc": self.calc}

    def calc(self, expression: str) -> str:
        value = safe_eval(expression, max_len=self.max_expression_chars)
        return "error: not arithmetic" if value is None else format_number(value)

    def reset(self, task: Mapping[str, Any]) -> str:
        self.answer, self.calls = float(task["answer"]), 0
        return self.instruction + str(task["question"] if "question" in task else task["prompt"])

    def step(self, action: str) -> Step:
        call = (parse_tool_call(action, max_argument_chars=self.max_expression_chars) if self.protocol == "tag" else
                parse_json_tool_call(action, max_body_chars=self.max_expression_chars + 64))
        if call is None:  # no tool call: the final answer
            value = final_answer(action)
            correct = value is not None and self.answer is not None and abs(value - self.answer) <= 1e-6
            return Step("", self.correct_reward if correct else 0.0, True)
        if isinstance(call, ParseError):
            return Step(f"<result>error: {call.message}</result>", 0.0, False, False)  # not a valid call
        self.calls += 1
        if self.calls > self.max_tool_calls:
            return Step("<result>error: no tool calls left</result>", 0.0, False)
        return Step(f"<result>{call_tool(self.tools, call, max_result_chars=32)}</result>", 0.0, False)


class CalculatorTasks(TaskSource):
    """Generated multi-step arithmetic ``a op b op c`` (operands of ``digits`` digits, ops from ``ops``), the
    answer computed by ``safe_eval``. The prompt is the bare question (the environment adds its instruction);
    meta ``question`` holds it too. level = number of operands.

    Args:
        digits: digits per operand (1-3).
        operands: operands per expression (2-4).
        ops: operators to draw from, a subset of "+-*".
    """

    def __init__(self, digits: int = 2, operands: int = 3, ops: str = "+-*"):
        if digits not in (1, 2, 3) or operands not in (2, 3, 4) or not ops or set(ops) - set("+-*"):
            raise ValueError(f"digits must be 1-3, operands 2-4 and ops a non-empty subset of '+-*', got {digits}, "
                             f"{operands}, {ops!r}")
        self.digits, self.operands, self.ops = digits, operands, "".join(sorted(set(ops), key="+-*".index))

    def make(self, n: int, seed: int) -> list[Problem]:
        rng, low, high = random.Random(seed), (0 if self.digits == 1 else 10 ** (self.digits - 1)), 10**self.digits - 1
        out = []
        for _ in range(n):
            terms = [str(rng.randint(low, high)) for _ in range(self.operands)]
            expr = terms[0] + "".join(f" {rng.choice(self.ops)} {x}" for x in terms[1:])
            question = f"What is {expr}?"
            out.append(Problem(question, format_number(safe_eval(expr)), "calculator", self.operands,
                               {"question": question, "expression": expr}))
        return out
