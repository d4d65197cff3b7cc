"""Math answer checking: answer extraction, math-verify under a timeout, reward callables.

Completions are untrusted (DESIGN.md "Security"): every parser first keeps only the
last `MAX_CHARS` characters, so a 1 MB completion costs the same as a 10 kB one, and
math-verify runs under a wall-clock deadline. An unparseable completion scores as a
wrong answer; malformed *data* (a non-numeric gold answer) raises and names the sample.

Reward protocol (used from YAML by import path):

    reward(completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> Tensor (B,) float32

where `samples[i]` is the prompt's metadata dict with at least `"answer"` (str).
"""

from __future__ import annotations

import multiprocessing
import re
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import torch

from common.rewards.base import RewardFunction

MAX_CHARS = 10_000  # completions are cut to their last MAX_CHARS characters before any regex or parser
_MAX_NUMBER_CHARS = 64  # longer digit strings are not answers (and int() refuses > 4300 digits)
_WORKER_START_S = 60.0  # first use of the worker process: spawn + import math_verify

_NUMBER = re.compile(r"(?:(?<!\d)-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _tail(text: str) -> str:
    return text[-MAX_CHARS:]


def last_number(text: str) -> str | None:
    """Last integer or decimal in `text`, commas removed: `"costs $1,234.50."` -> `"1234.50"`.

    A `-` counts as a sign only when no digit precedes it (`"5-3"` -> `"3"`).
    """
    matches = _NUMBER.findall(_tail(text))
    return matches[-1].replace(",", "") if matches else None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces balanced), stripped; None if absent or unclosed."""
    text = _tail(text)
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i].strip()
    return None


def gsm8k_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after `####`, commas removed (`"#### 1,200"` -> `"1200"`)."""
    if "####" not in solution:
        raise ValueError(f"solution has no '####' answer marker: {solution[-200:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _to_number(text: str) -> Fraction | None:
    text = text.strip().replace(",", "")
    if len(text) > _MAX_NUMBER_CHARS:
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


# ---------------------------------------------------------------- math-verify under a deadline


def _verify_unbounded(pred: str, gold: str) -> bool:
    """math-verify with its own (signal-based, main-thread-only) timeouts disabled; the caller bounds time."""
    import math_verify.grader
    import math_verify.parser
    from math_verify import parse, verify

    # Silence math-verify's "timeout is disabled" warning: the deadline is enforced by the caller.
    math_verify.parser.TIMEOUT_WARNING_SHOWN = math_verify.grader.TIMEOUT_WARNING_SHOWN = True

    def wrap(s: str) -> str:  # `$...$` lets math-verify read bare LaTeX such as \sqrt{2} or x+1
        return s if "$" in s or "\\boxed" in s else f"${s}$"

    gold_parsed = parse(wrap(gold), parsing_timeout=None)
    pred_parsed = parse(wrap(pred), parsing_timeout=None)
    return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None))


class _Deadline(BaseException):
    """Raised by SIGALRM. A BaseException, so math-verify's `except Exception` cannot swallow it."""


def _with_alarm(fn: Callable[[], bool], seconds: float) -> bool:
    """fn() in the main thread, interrupted after `seconds` by a one-shot ITIMER_REAL (-> False).

    Replaces any SIGALRM handler for the duration and restores it afterwards. A single long
    C call (no Python bytecode) is interrupted only when it returns.
    """
    fired = []

    def on_alarm(signum: int, frame: object) -> None:
        if not fired:
            fired.append(True)
            raise _Deadline

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:
        return False
    finally:
        signal.signal(signal.SIGALRM, previous)


def _serve(conn: Any) -> None:
    """Worker-process loop: receive (pred, gold), send the verdict."""
    conn.send("ready")
    while True:
        pred, gold = conn.recv()
        try:
            conn.send(_verify_unbounded(pred, gold))
        except Exception:
            conn.send(False)


class _Worker:
    """One spawned process for calls from non-main threads (signals work only in the main
    thread). A call that overruns its timeout kills the process; the next call starts a new one.
    As with any "spawn" multiprocessing, a script that uses it needs an `if __name__ == "__main__":` guard."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: Any = None
        self._conn: Any = None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child,), daemon=True)
        self._process.start()
        if not self._conn.poll(_WORKER_START_S):
            self._stop()
            raise RuntimeError(f"math-verify worker did not start within {_WORKER_START_S} s")
        self._conn.recv()

    def _stop(self) -> None:
        self._process.kill()
        self._process.join()
        self._process = None

    def __call__(self, pred: str, gold: str, timeout_s: float) -> bool:
        with self._lock:
            if self._process is None or not self._process.is_alive():
                self._start()
            self._conn.send((pred, gold))
            if self._conn.poll(timeout_s):
                return bool(self._conn.recv())
            self._stop()
            return False


_WORKER = _Worker()


def math_verify_equal(pred: str, gold: str, timeout_s: float = 5.0) -> bool:
    """Whether `pred` and `gold` are mathematically equal according to math-verify
    (`parse` + `verify`, https://github.com/huggingface/Math-Verify), within `timeout_s` seconds.

    math-verify's own timeouts use `signal.alarm` (whole seconds, main thread only, and
    per call). Instead one deadline covers parse + parse + verify: in the main thread a
    SIGALRM timer; in any other thread a worker process that is killed on overrun.
    Timeout or any exception -> False. `pred` is cut to its last MAX_CHARS characters.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    pred = _tail(pred)
    try:
        if threading.current_thread() is threading.main_thread():
            return _with_alarm(lambda: _verify_unbounded(pred, gold), timeout_s)
        return _WORKER(pred, gold, timeout_s)
    except Exception:
        return False


# ---------------------------------------------------------------- reward callables


class PerSampleReward(RewardFunction):
    """Base for rewards that score each (completion, sample) pair on its own.

    Subclasses implement `score`; `__call__` applies it to a batch and returns (B,) float32.
    An exception from `score` (a data bug, never model output) gets a note naming the sample.
    """

    def score(self, completion: str, sample: Mapping[str, Any]) -> float:
        raise NotImplementedError

    def __call__(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        if len(completions) != len(samples):
            raise ValueError(
                f"completions and samples must have the same length, got {len(completions)} and {len(samples)}"
            )
        scores = []
        for i, (completion, sample) in enumerate(zip(completions, samples)):
            try:
                scores.append(self.score(completion, sample))
            except Exception as error:
                error.add_note(f"{type(self).__name__} failed on samples[{i}] = {dict(sample)!r:.300}")
                raise
        return torch.tensor(scores, dtype=torch.float32)  # (B,)


def _gold_number(sample: Mapping[str, Any]) -> Fraction:
    gold = _to_number(str(sample["answer"]))
    if gold is None:
        raise ValueError(f"sample['answer'] must be a number, got {sample['answer']!r}")
    return gold


class NumericAnswerReward(PerSampleReward):
    """`correct` if the last number in the completion equals `sample["answer"]` exactly
    (as rationals: "3.50" == "3.5", "1,200" == "1200"), else `wrong`."""

    def __init__(self, correct: float = 1.0, wrong: float = 0.0) -> None:
        self.correct, self.wrong = float(correct), float(wrong)

    def score(self, completion: str, sample: Mapping[str, Any]) -> float:
        gold = _gold_number(sample)
        pred = last_number(completion)
        return self.correct if pred is not None and _to_number(pred) == gold else self.wrong


class MathVerifyReward(PerSampleReward):
    """1.0 if the completion's answer equals `sample["answer"]` by math-verify, else 0.0.

    The answer is the last `\\boxed{...}` if present, else the last number in the text.
    Each check is bounded by `timeout_s` seconds (a timeout scores 0.0).
    """

    def __init__(self, timeout_s: float = 5.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)

    def score(self, completion: str, sample: Mapping[str, Any]) -> float:
        gold = str(sample["answer"])
        pred = extract_boxed(completion)
        if pred is None:
            pred = last_number(completion)
        return float(pred is not None and math_verify_equal(pred, gold, self.timeout_s))


class FormatReward(PerSampleReward):
    """`reward` if `re.search(pattern, completion)` matches (on the last MAX_CHARS characters), else 0.0."""

    def __init__(self, pattern: str = r"\\boxed\{.+\}", reward: float = 1.0) -> None:
        try:
            self.pattern = re.compile(pattern)
        except re.error as error:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {error}") from error
        self.reward = float(reward)

    def score(self, completion: str, sample: Mapping[str, Any]) -> float:
        return self.reward if self.pattern.search(_tail(completion)) else 0.0
