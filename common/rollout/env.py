"""Environments for multi-turn agents (shared/methods/agentic.md §1, issue 21), and a bounded tool-call parser.

An environment is a small Python object the agent acts in, one instance per episode:

    reset(task)    -> observation text                 (the task is a data module's sample dict)
    step(action)   -> Step(observation, reward, done)  (the action is the text the model wrote in one turn)

Tools are environment actions: an environment owns a fixed table of its own functions (``tools``) and calls
nothing else; no tool ever reaches ``eval``, ``exec``, the shell, the network or the file system. Model output is
hostile input: an action is cut to ``MAX_ACTION_CHARS`` before it is parsed, a tool argument longer than its bound
is refused without being looked at, tool results are cut to ``max_result_chars``, and ``run_step`` bounds the time
of a step (a step that raises or hangs ends the episode with a typed reason; it never crashes the run).

The agent that drives environments is ``common.policies.agent.MultiTurnAgentPolicy``; its episode limits are
:class:`EpisodeLimits` and its episodes end with one of :data:`END_REASONS`. The outcome reward of an episode
reaches the loop's reward functions through the sample dict (``episode_return``, read by :class:`EpisodeReturn`).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from common.rewards.base import RewardFunction, call_with_timeout

log = logging.getLogger(__name__)

MAX_ACTION_CHARS = 4096  # an action's text is cut to its last MAX_ACTION_CHARS characters before any parsing
TOOL_OPEN, TOOL_CLOSE = "<tool>", "</tool>"

# Why an episode ended (``RolloutBatch.end_reason`` holds the index into this tuple; new reasons are appended):
#   done         the environment said so
#   stopped      the model ended the sequence (EOS) before the environment was done
#   max_turns    the turn budget ran out (truncated)
#   overflow     the token budget of the sequence (actions + observations) ran out (context overflow)
#   timeout      a reset, step or tool took longer than ``EpisodeLimits.step_timeout_s`` (tool timeout)
#   env_error    the environment raised (logged with the task and the action)
#   parse_error  ``EpisodeLimits.max_parse_errors`` actions in the episode did not parse (``Step.valid`` False)
END_REASONS = ("done", "stopped", "max_turns", "overflow", "timeout", "env_error", "parse_error")
FAILURES = ("timeout", "env_error", "parse_error")  # reasons whose return is ``failure_reward`` unless configured


class Step(NamedTuple):
    observation: str  # text the environment writes back (appended to the sequence, masked out of the loss)
    reward: float  # immediate reward r_t
    done: bool  # the episode is over
    valid: bool = True  # the action parsed (False: a parse error or an invalid action; counted, see max_parse_errors)


# ---------------------------------------------------------------- clocks


class Clock:
    """Wall time for environments and the step runner: ``now()`` seconds, ``sleep(s)``. Environments and tools that
    wait (a slow tool, a remote call) wait through ``self.clock`` so that a test can swap in :class:`FakeClock`."""

    real = True

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class FakeClock(Clock):
    """A clock that never waits: ``sleep(s)`` advances ``now()`` by ``s`` at once (thread-safe). With it,
    :func:`run_step` runs a call inline and reads its duration off this clock, so a tool that "hangs" (sleeps for
    an hour of fake time) times out deterministically and instantly; nothing depends on the machine's load."""

    real = False

    def __init__(self, start: float = 0.0):
        self.t = float(start)
        self._lock = threading.Lock()

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.t += max(0.0, float(seconds))


def stable_hash(text: str) -> int:
    """A 63-bit non-negative hash of a text, the same in every process (blake2b; Python's ``hash`` is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "little") >> 1


class Environment:
    """Base class of text environments (see the module docstring). Subclasses implement ``reset`` and ``step``;
    ``spawn`` makes the fresh instance of one episode (default: a deep copy of this, never-reset, prototype).
    Environments are named by ``class_path`` in YAML, so their arguments are typed.

    ``stop_strings``: texts that end an assistant turn besides EOS (a tool environment's ``</tool>``), so that the
    environment answers the call.
    """

    stop_strings: tuple[str, ...] = ()
    clock: Clock = Clock()  # set by the agent on every spawned instance (EpisodeLimits.clock)
    rng: random.Random = random.Random(0)  # seeded by the agent before every reset, from (task id, episode seed)

    def reset(self, task: Mapping[str, Any]) -> str:
        raise NotImplementedError

    def step(self, action: str) -> Step:
        raise NotImplementedError

    def spawn(self) -> "Environment":
        return copy.deepcopy(self)

    def seed(self, seed: int) -> None:
        """Seed this episode's randomness (``self.rng``); called before ``reset`` with the episode's seed, derived
        from (task id, episode seed) so an evaluation panel resets to the same states in every run."""
        self.rng = random.Random(seed)

    def state_text(self, observation: str) -> str:
        """The canonical text of the current state after ``observation`` was returned: history-free, no
        instruction (GiGPO's anchor states hash it; agentic.md §14.4). Default: the observation, stripped;
        environments whose observations carry more than the state override it."""
        return observation.strip()


@dataclass
class EpisodeLimits:
    """Bounds of one episode of a multi-turn agent.

    Args:
        max_turns: assistant turns per episode (each is one generate call and one environment step).
        max_total_tokens: tokens of the whole completion (assistant and environment tokens), the row width T.
        max_observation_tokens: an observation is cut to this many tokens.
        step_timeout_s: seconds a reset or step may take (None = unbounded); a late step ends the episode.
        failure_reward: the return of an episode that ended by ``timeout``, ``env_error`` or ``parse_error``.
        end_rewards: the return of an episode that ended for one of these reasons (names from END_REASONS),
            replacing what it collected; overrides ``failure_reward`` for the reasons it names. The difference is
            carried on the episode's last turn, so its turn rewards still sum to its return.
        max_parse_errors: an episode ends (``parse_error``) at its k-th action that does not parse (``Step.valid``
            False); None = never (the environment answers a bad action with an error text and the episode goes on).
        observation_prefix / observation_suffix: text around every observation (e.g. the chat template's
            end-of-turn and tool-turn markers); empty = the observation continues the assistant's text inline.
        observation_role: render every observation as a chat message of this role (``"user"``, ``"tool"``) with the
            policy's chat template: the assistant turn's end, the message and the next generation prompt, as the
            template writes them (overrides prefix/suffix); an action that ends with EOS then ends its turn, not the
            episode (a chat turn's normal end). The history is also re-rendered through the template before every
            turn and compared with the sampled tokens (``RolloutBatch.turn_drift``).
        clock: the clock of the environments and of the step timeout (``FakeClock`` in tests; default wall time).
        layout: how the agent stores episodes (agentic.md §1): ``"episode"`` (layout B, one row per episode: the
            actions and observations concatenated) or ``"turn"`` (layout A, one row per turn: the exact context the
            turn was sampled from as the prompt, the action as the completion). Same tokens either way.
    """

    max_turns: int = 4
    max_total_tokens: int = 256
    max_observation_tokens: int = 32
    step_timeout_s: float | None = 5.0
    failure_reward: float = 0.0
    end_rewards: dict[str, float] | None = None
    max_parse_errors: int | None = None
    observation_prefix: str = ""
    observation_suffix: str = ""
    observation_role: str | None = None
    clock: Clock | None = None
    layout: str = "episode"

    def __post_init__(self):
        problems = []
        if self.layout not in ("episode", "turn"):
            problems.append(f"layout must be 'episode' (one row per episode) or 'turn' (one row per turn), got {self.layout!r}")
        for name in ("max_turns", "max_total_tokens", "max_observation_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.step_timeout_s is not None and not self.step_timeout_s > 0:
            problems.append(f"step_timeout_s must be > 0 or None, got {self.step_timeout_s!r}")
        bad = sorted(set(self.end_rewards or {}) - set(END_REASONS))
        if bad:
            problems.append(f"end_rewards names unknown end reasons {bad}; expected names from {END_REASONS}")
        if self.max_parse_errors is not None and (not isinstance(self.max_parse_errors, int) or self.max_parse_errors < 1):
            problems.append(f"max_parse_errors must be a positive integer or None, got {self.max_parse_errors!r}")
        if self.observation_role is not None and not (isinstance(self.observation_role, str) and self.observation_role.strip()):
            problems.append(f"observation_role must be a chat role such as 'user' or 'tool', or None, got {self.observation_role!r}")
        if self.clock is not None and not isinstance(self.clock, Clock):
            problems.append(f"clock must be a common.rollout.env.Clock, got {type(self.clock).__name__}")
        if problems:
            raise ValueError("EpisodeLimits: " + "; ".join(problems))

    def end_reward(self, reason: str) -> float | None:
        """The configured return of an episode that ended for ``reason`` (None: it keeps what it collected)."""
        if self.end_rewards and reason in self.end_rewards:
            return float(self.end_rewards[reason])
        return self.failure_reward if reason in FAILURES else None


class Outcome(NamedTuple):
    value: Any  # what the call returned (an observation, a Step); None when it failed
    reason: str | None  # None, "timeout" or "env_error"


def run_step(fn: Callable[[Any], Any], arg: Any, timeout_s: float | None, what: str, clock: Clock | None = None) -> Outcome:
    """``fn(arg)`` (an environment's reset or step) bounded in time; an exception or a timeout is an outcome, not
    an error of the run (one warning line names the call and the cause). With a real clock the call runs in a
    daemon thread that is abandoned at the deadline; with a :class:`FakeClock` it runs inline and is late when the
    fake time it used (its ``clock.sleep``s) exceeds ``timeout_s``: deterministic."""
    try:
        if clock is not None and not clock.real:
            start = clock.now()
            value = fn(arg)
            if timeout_s is not None and clock.now() - start > timeout_s:
                raise TimeoutError
            return Outcome(value, None)
        return Outcome(call_with_timeout(fn, arg, timeout_s=timeout_s), None)
    except TimeoutError:
        log.warning("environment %s timed out after %s s; the episode ends (timeout)", what, timeout_s)
        return Outcome(None, "timeout")
    except Exception as err:  # noqa: BLE001 - an environment's failure ends its episode, not the run
        log.warning("environment %s raised %r; the episode ends (env_error)", what, err)
        return Outcome(None, "env_error")


def as_step(value: Any) -> Step:
    """An environment's step return as a Step; anything else (a wrong arity, a non-finite reward) raises."""
    observation, reward, done, *rest = value
    if len(rest) > 1:
        raise ValueError(f"a step returns (observation, reward, done[, valid]), got {len(rest) + 3} values")
    reward = float(reward)
    if reward != reward or reward in (float("inf"), float("-inf")):
        raise ValueError(f"non-finite reward {reward}")
    return Step(str(observation), reward, bool(done), bool(rest[0]) if rest else True)


# ---------------------------------------------------------------- tool calls


@dataclass(frozen=True)
class ToolCall:
    name: str  # the tool's name, [a-z_][a-z0-9_]* and at most MAX_TOOL_NAME characters
    argument: str  # the text after "name:", stripped, at most max_argument_chars characters


@dataclass(frozen=True)
class ParseError:
    message: str  # why the action is not a tool call (fed back to the model as the observation)


MAX_TOOL_NAME = 32


def parse_tool_call(action: str, *, max_argument_chars: int = 256) -> ToolCall | ParseError | None:
    """The last ``<tool>name: argument</tool>`` of an action; None when the action holds no tool tag (a final
    answer), ParseError when it holds one but the call is malformed (unclosed tag, no name, bad name, argument too
    long, a closing tag whose opening lies beyond the bound). Bounded: the action is cut to its last MAX_ACTION_CHARS
    characters, and only ``str.rfind``/``find`` and slicing run on it (no regex backtracking, no eval); nothing of the
    argument is interpreted here.

        parse_tool_call("<tool>calc: 12+7</tool>")  -> ToolCall("calc", "12+7")
        parse_tool_call("<tool>calc: 12+7")         -> ParseError("unclosed <tool> tag")
    """
    if not isinstance(action, str):
        return ParseError("the action is not text")
    text = action[-MAX_ACTION_CHARS:]
    start = text.rfind(TOOL_OPEN)
    if start < 0:  # a closing tag alone: a call whose opening lies beyond the bound
        return ParseError(f"tool call longer than {MAX_ACTION_CHARS} characters") if TOOL_CLOSE in text else None
    end = text.find(TOOL_CLOSE, start)
    if end < 0:
        return ParseError(f"unclosed {TOOL_OPEN} tag")
    body = text[start + len(TOOL_OPEN): end]
    colon = body.find(":", 0, MAX_TOOL_NAME + 2)
    if colon < 0:
        return ParseError("a tool call is <tool>name: argument</tool>")
    name = body[:colon].strip()
    if not (0 < len(name) <= MAX_TOOL_NAME and name.isascii() and (name[0].isalpha() or name[0] == "_")
            and all(c.isalnum() or c == "_" for c in name)):
        return ParseError("bad tool name")
    argument = body[colon + 1:]
    if len(argument) > max_argument_chars + 64:  # whitespace around the argument is allowed, within bounds
        return ParseError(f"tool argument longer than {max_argument_chars} characters")
    argument = argument.strip()
    if len(argument) > max_argument_chars:
        return ParseError(f"tool argument longer than {max_argument_chars} characters")
    return ToolCall(name.lower(), argument)


JSON_OPEN, JSON_CLOSE = "<tool_call>", "</tool_call>"


def parse_json_tool_call(action: str, *, max_body_chars: int = 512) -> ToolCall | ParseError | None:
    """The last ``<tool_call>{"name": ..., "arguments": {"key": value}}</tool_call>`` of an action (the function-calling
    format of chat templates such as SmolLM2's and Qwen's), for single-argument tools: the one argument's value
    becomes ``ToolCall.argument`` (a string or a number, as text). None when the action holds no such tag;
    ParseError when the call is malformed. Bounded: the action is cut to its last MAX_ACTION_CHARS characters and
    the JSON body to ``max_body_chars`` before ``json.loads`` sees it (so nesting is at most that deep); a JSON
    parser builds data, never code.

        parse_json_tool_call('<tool_call>{"name": "calc", "arguments": {"expression": "12+7"}}</tool_call>')
            -> ToolCall("calc", "12+7")
    """
    import json

    if not isinstance(action, str):
        return ParseError("the action is not text")
    text = action[-MAX_ACTION_CHARS:]
    start = text.rfind(JSON_OPEN)
    if start < 0:
        return ParseError(f"tool call longer than {MAX_ACTION_CHARS} characters") if JSON_CLOSE in text else None
    end = text.find(JSON_CLOSE, start)
    if end < 0:
        return ParseError(f"unclosed {JSON_OPEN} tag")
    body = text[start + len(JSON_OPEN): end].strip()
    if len(body) > max_body_chars:
        return ParseError(f"tool call longer than {max_body_chars} characters")
    try:
        call = json.loads(body)
    except (ValueError, RecursionError):
        return ParseError("the tool call is not valid JSON")
    if not (isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments"), dict)):
        return ParseError('a tool call is {"name": "...", "arguments": {...}}')
    name, arguments = call["name"].strip(), call["arguments"]
    if not (0 < len(name) <= MAX_TOOL_NAME and name.isascii() and (name[0].isalpha() or name[0] == "_")
            and all(c.isalnum() or c == "_" for c in name)):
        return ParseError("bad tool name")
    if len(arguments) != 1:
        return ParseError("the tool takes exactly one argument")
    (value,) = arguments.values()
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return ParseError("the argument must be a string or a number")
    return ToolCall(name.lower(), str(value).strip())


def call_tool(tools: Mapping[str, Callable[[str], str]], call: ToolCall, max_result_chars: int = 256) -> str:
    """Run one of the environment's own tools; an unknown name or a tool that raises gives an error text (the
    result is cut to ``max_result_chars``)."""
    fn = tools.get(call.name)
    if fn is None:
        return f"error: unknown tool {call.name[:MAX_TOOL_NAME]!r} (tools: {', '.join(sorted(tools))})"
    try:
        return str(fn(call.argument))[:max_result_chars]
    except Exception as err:  # noqa: BLE001 - a tool's failure is the model's feedback
        return f"error: {type(err).__name__}"[:max_result_chars]


# ---------------------------------------------------------------- the outcome reward


class EpisodeReturn(RewardFunction):
    """The environment's return of each episode, ``Σ_t r_t`` as the agent recorded it in ``sample["episode_return"]``
    (the outcome reward of episode-level GRPO). Raises naming the key when a row was not produced by an agent."""

    name = "episode_return"

    def __call__(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> Tensor:
        missing = [i for i, s in enumerate(samples) if "episode_return" not in s]
        if missing:
            raise ValueError(f"EpisodeReturn: samples {missing[:5]} have no 'episode_return' (rows not produced by "
                             "MultiTurnAgentPolicy; set the module's environment)")
        return torch.tensor([float(s["episode_return"]) for s in samples], dtype=torch.float32)


__all__ = ["END_REASONS", "Clock", "Environment", "EpisodeLimits", "EpisodeReturn", "FakeClock", "ParseError", "Step",
           "ToolCall", "call_tool", "parse_json_tool_call", "parse_tool_call", "run_step", "stable_hash"]
