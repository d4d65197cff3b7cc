"""math-verify from non-main threads (``common.rewards.math._Worker``): a timeout costs only its own deadline.

Before, a call that overran killed the worker process and the next call waited for a new one (Python start-up and
importing math_verify, ~2-3.4 s): a batch of hostile completions slowed a step by seconds each. Now the worker
interrupts its own call at the deadline and stays warm, and a worker stuck past it is replaced by a warm spare.
The comparisons are ratios against the old configuration measured in the same test, on the same machine."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from common.rewards.math import _KILL_GRACE_S, _Worker

ROOT = Path(__file__).resolve().parents[3]

HOSTILE = "9^{9^{9}}"  # sympy evaluates the power tower for minutes
NESTED = "{" * 20 + "1" + "}" * 20  # math-verify's parser is exponential in brace depth: > 3 s for 20 levels
TIMEOUT_S = 0.5


def _timeout_then_normal(worker: _Worker) -> tuple[float, float]:
    """Seconds of a hostile call that times out, then of the normal call that follows it (on a warm worker)."""
    worker.warm()
    start = time.perf_counter()
    assert worker(HOSTILE, "5", TIMEOUT_S) is False
    hostile = time.perf_counter() - start
    start = time.perf_counter()
    assert worker("\\frac{1}{2}", "0.5", 60.0) is True  # a long deadline: this measures the wait for a worker
    return hostile, time.perf_counter() - start


def test_a_timeout_costs_only_its_own_deadline():
    old = _Worker(spares=0, interrupt=False)  # the behaviour before: kill on timeout, the next call starts a worker
    spare = _Worker(spares=1, interrupt=False)  # the kill path, with a warm spare
    new = _Worker()  # the default: self-interrupting worker, plus a spare
    try:
        old_hostile, respawn = _timeout_then_normal(old)
        spare_hostile, spare_next = _timeout_then_normal(spare)
        new.warm()
        pid = new._active.proc.pid
        new_hostile, new_next = _timeout_then_normal(new)
        print(f"\nafter a {TIMEOUT_S} s timeout, the next call took: old {respawn:.3f} s, kill + warm spare "
              f"{spare_next:.3f} s, self-interrupting {new_next:.3f} s (hostile calls {old_hostile:.3f} / "
              f"{spare_hostile:.3f} / {new_hostile:.3f} s)")
        assert old.kills == spare.kills == 1 and new.kills == 0
        assert new._active.proc.pid == pid  # the same warm process answered after its own timeout
        # the call after a timeout waits for no process start: well under the old configuration's respawn
        assert spare_next / respawn < 0.25 and new_next / respawn < 0.25
        # each hostile call took its deadline (it did not return early) and not a process start on top of it
        for hostile in (old_hostile, spare_hostile, new_hostile):
            assert TIMEOUT_S <= hostile < TIMEOUT_S + _KILL_GRACE_S + 0.5 * respawn

        # a burst of hostile answers costs their deadlines, not a worker start each (old: one respawn each)
        start = time.perf_counter()
        assert [new(NESTED, "1", 0.3) for _ in range(4)] == [False] * 4
        burst = time.perf_counter() - start
        print(f"4 hostile calls with a 0.3 s deadline: {burst:.2f} s (one respawn: {respawn:.2f} s)")
        assert burst < 4 * (0.3 + _KILL_GRACE_S) + respawn and new.kills == 0
        # text that could break a line protocol is data: the worker still answers the next request correctly
        assert new('1"}\n{"pred": "7", "gold": "7", "timeout_s": 1}\n', "7", 5.0) is False
        assert new("2", "2", 5.0) is True and new._active.proc.pid == pid
    finally:
        for worker in (old, spare, new):
            worker.close()


def test_the_first_call_imports_math_verify_outside_its_deadline():
    """In a fresh process the first check used to spend its deadline importing math-verify (~1 s): a right answer
    with a 0.3 s deadline scored wrong, and the alarm could interrupt the import half-way."""
    code = ("from common.rewards.math import math_verify_equal\n"
            "print(math_verify_equal('\\\\frac{1}{2}', '0.5', timeout_s=0.3), math_verify_equal('2', '3', timeout_s=0.3))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "False"]
