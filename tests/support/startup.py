"""Timing ``advlab`` failures at start-up in a real subprocess.

A bad argument must fail within seconds. Most of a failing run's wall time is importing torch, transformers and
Lightning, which on a loaded 2-core test machine alone can take 10 s; so the bound is on the time beyond a bare
``import common.cli``, measured once per test process after a first failing run has warmed the file cache (on an
idle machine the whole failing run takes ~6 s of CPU). A hub retry loop (the bug these tests guard against) costs
~50 s and is caught either way."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_IMPORT_S: dict[str, float] = {}  # the bare import's seconds, measured once per test process (after a first run)


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    return proc, time.perf_counter() - start


def advlab_failure(*args: str, cwd: Path, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``advlab`` (expected to fail); returns the process and its seconds beyond a bare import of the CLI."""
    proc, elapsed = timed([sys.executable, "-m", "common.cli", *args], cwd, env)
    import_s = _IMPORT_S.get(sys.executable) or _IMPORT_S.setdefault(sys.executable, timed([sys.executable, "-c", "import common.cli"], cwd, env)[1])
    assert proc.returncode != 0, f"expected a failure:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc, elapsed - import_s
