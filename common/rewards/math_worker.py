"""math-verify under a deadline, in this process (``with_alarm``) or in a worker process (``serve``, run as a script).

``common.rewards.math`` checks answers in the main thread with ``with_alarm`` (SIGALRM), and from any other thread
through worker processes that run :func:`serve` (``common.rewards.math._Worker``). The worker imports
math_verify only (not torch, not the caller's ``__main__``), warms its parser, says ``ready``, then answers one
request a line on stdin:

    parent -> {"pred": "...", "gold": "...", "timeout_s": 0.5 or null}\\n
    worker -> true\\n | false\\n

and interrupts its own call at ``timeout_s`` (SIGALRM in its main thread), so a timeout leaves it alive and warm;
only a call stuck in one long C call overruns, and the parent kills that worker. Model output is hostile input:
nothing here evaluates it; math-verify parses it into sympy under the deadline.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable


def verify_unbounded(pred: str, gold: str) -> bool:
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


_WARM: list[bool] = []


def warm() -> None:
    """Import math_verify and build its parser once, outside any deadline: an import interrupted by the alarm
    would leave half-initialised modules behind, and its ~1 s is not the completion's fault."""
    if not _WARM:
        verify_unbounded("\\frac{1}{2}", "0.5")
        _WARM.append(True)


class _Deadline(BaseException):
    """Raised by SIGALRM. A BaseException, so math-verify's `except Exception` cannot swallow it."""


def with_alarm(fn: Callable[[], bool], seconds: float) -> bool:
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


def serve() -> None:
    """The worker's loop (module docstring). Replies go to the original stdout; anything a library prints goes to
    stderr, so it cannot corrupt the protocol."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    warm()  # import math_verify and build its parser before saying ready
    out.write("ready\n")
    for line in sys.stdin:
        try:
            request = json.loads(line)
            pred, gold, timeout_s = str(request["pred"]), str(request["gold"]), request["timeout_s"]
            if timeout_s is None:
                ok = verify_unbounded(pred, gold)
            else:
                ok = with_alarm(lambda: verify_unbounded(pred, gold), float(timeout_s))
        except Exception:  # noqa: BLE001 - an unparseable answer is a wrong answer
            ok = False
        out.write("true\n" if ok else "false\n")

