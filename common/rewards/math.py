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

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from common.rewards.base import RewardFunction

MAX_CHARS = 10_000  # completions are cut to their last MAX_CHARS characters before any regex or parser
MAX_ANSWER_CHARS = 1_000  # an extracted answer longer than this is wrong without parsing (MATH's longest are ~200)
_MAX_NUMBER_CHARS = 64  # longer digit strings are not answers (and int() refuses > 4300 digits)
_WORKER_START_S = 60.0  # a new worker process: Python start-up + import math_verify (~1-3 s; generous under load)
_ROOT = str(Path(__file__).resolve().parents[2])  # the repository root, importable by the worker process
_KILL_GRACE_S = 0.2  # a worker that has not answered this long after its deadline is stuck in C code: killed

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


class _Process:
    """One worker process running ``common.rewards.math_worker.serve`` (its module docstring has the protocol)."""

    def __init__(self) -> None:
        code = f"import sys; sys.path.insert(0, {_ROOT!r}); from common.rewards.math_worker import serve; serve()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.ready = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def read_line(self, timeout_s: float) -> str | None:
        """The worker's next line, or None if none came within `timeout_s` seconds (or the worker died)."""
        fd, data = self.proc.stdout.fileno(), b""
        deadline = time.monotonic() + timeout_s
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 256)
            if not chunk:  # the worker exited
                return None
            data += chunk
        return data.decode().strip()

    def wait_ready(self) -> None:
        if not self.ready:
            if self.read_line(_WORKER_START_S) != "ready":
                self.kill()
                raise RuntimeError(f"math-verify worker did not start within {_WORKER_START_S} s (is math-verify "
                                   "installed in this Python?)")
            self.ready = True

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()


class _Worker:
    """Worker processes for calls from non-main threads (signals work only in the main thread), so a timeout costs
    only its own deadline.

    The worker in use interrupts its own call at the deadline and stays warm; a worker that has not answered
    ``_KILL_GRACE_S`` after the deadline (stuck in one long C call) is killed and a warm spare takes its place at
    once, while a new spare starts in the background. Without spares the next call would wait for a new process
    (~1-3 s: Python start-up and importing math_verify).

    Args:
        spares: warm processes kept besides the one in use.
        interrupt: the worker interrupts its own call at the deadline (False: every timeout kills the worker, the
            behaviour before spares and self-interruption; kept for the tests that measure the difference).
    """

    def __init__(self, spares: int = 1, interrupt: bool = True) -> None:
        self.spares, self.interrupt = spares, interrupt
        self._lock = threading.Lock()
        self._active: _Process | None = None
        self._spare: list[_Process] = []
        self.kills = 0  # workers killed after overrunning their deadline
        _LIVE.add(self)

    def _after_fork_in_child(self) -> None:
        """A forked child starts its own workers: the parent's are forgotten (not killed), the lock is new."""
        self._lock, self._active, self._spare = threading.Lock(), None, []

    def _take(self) -> _Process:
        """The worker for the next call: the one in use, else the oldest spare, else a new one (waits until ready);
        then the spares are topped up (they start in the background)."""
        if self._active is None or not self._active.alive():
            self._spare = [p for p in self._spare if p.alive()]
            self._active = self._spare.pop(0) if self._spare else _Process()
            self._active.wait_ready()
        while len(self._spare) < self.spares:
            self._spare.append(_Process())
        return self._active

    def warm(self) -> None:
        """Start the worker in use and the spares, and wait until every one is ready."""
        with self._lock:
            self._take()
            for p in self._spare:
                p.wait_ready()

    def close(self) -> None:
        with self._lock:
            for p in [self._active, *self._spare]:
                if p is not None:
                    p.kill()
            self._active, self._spare = None, []

    def __call__(self, pred: str, gold: str, timeout_s: float) -> bool:
        with self._lock:
            worker = self._take()
            request = {"pred": pred, "gold": gold, "timeout_s": timeout_s if self.interrupt else None}
            try:
                worker.proc.stdin.write((json.dumps(request) + "\n").encode())
                worker.proc.stdin.flush()
            except OSError:  # the worker died between calls
                worker.kill()
                self._active = None
                return False
            reply = worker.read_line(timeout_s + (_KILL_GRACE_S if self.interrupt else 0.0))
            if reply is None:  # overran: kill it; the next call takes a warm spare
                worker.kill()
                self._active, self.kills = None, self.kills + 1
                if self.spares:
                    self._take()  # promote a spare and start its replacement now, not in the next call
                return False
            return reply == "true"


_LIVE: weakref.WeakSet[_Worker] = weakref.WeakSet()
atexit.register(lambda: [w.close() for w in list(_LIVE)])
os.register_at_fork(after_in_child=lambda: [w._after_fork_in_child() for w in list(_LIVE)])
_WORKER = _Worker()


def math_verify_equal(pred: str, gold: str, timeout_s: float = 5.0) -> bool:
    """Whether `pred` and `gold` are mathematically equal according to math-verify
    (`parse` + `verify`, https://github.com/huggingface/Math-Verify), within `timeout_s` seconds.

    math-verify's own timeouts use `signal.alarm` (whole seconds, main thread only, and
    per call). Instead one deadline covers parse + parse + verify, from any thread: a worker
    process (``_Worker``) that interrupts itself at the deadline and stays warm; one stuck past
    it in a long C call is killed ``_KILL_GRACE_S`` later and a warm spare takes over. (A SIGALRM
    in the calling process cannot interrupt a C call: it overshot a 0.2 s deadline by 0.25-3 s.)
    Timeout or any exception -> False. `pred` is cut to its last MAX_CHARS characters.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    pred = _tail(pred)
    try:  # in a worker process from every thread: the main thread's SIGALRM waits for a long C call to return
        return _WORKER(pred, gold, timeout_s)  # (measured: 0.25-3 s past a 0.2 s deadline), the worker is killed
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

    The answer is the last `\\boxed{...}` if present, else the last number in the text; one longer
    than MAX_ANSWER_CHARS scores 0.0 unparsed. Each check is bounded by `timeout_s` seconds (a
    timeout scores 0.0).
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
        if pred is None or len(pred) > MAX_ANSWER_CHARS:  # a 10 kB "answer" is wrong: math-verify never sees it
            return 0.0
        return float(math_verify_equal(pred, gold, self.timeout_s))


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
