"""Progress of long scripts (benchmarks, reproductions, data generation, evaluation) on stderr.

``for seed in progress(range(SEEDS), "dapo: seeds"):`` yields the items unchanged and prints
``dapo: seeds 3/20, 12.4 s elapsed, ~70 s left`` to stderr, at most every ``ADVLAB_PROGRESS_EVERY`` seconds
(default 5), and after the last item once a line was printed (a loop faster than that prints nothing). It touches
no random state and no number the script computes; stdout (the tables and verdict lines the scripts print) is
unchanged. ``ADVLAB_PROGRESS=0`` silences it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def _fmt(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def progress(items: Iterable[T], label: str, total: int | None = None, every_s: float | None = None,
             stream=None) -> Iterator[T]:
    """Yield ``items``, printing ``label i/N, elapsed, ~left`` to ``stream`` (stderr) at most every ``every_s``
    seconds and after the last one. ``total`` defaults to ``len(items)`` where it has one."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    quiet = os.environ.get("ADVLAB_PROGRESS", "1") == "0"
    every_s = float(os.environ.get("ADVLAB_PROGRESS_EVERY", 5.0)) if every_s is None else every_s
    start = last = time.perf_counter()
    i, printed = 0, False
    for i, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        # every every_s seconds; the last item too once a line was printed (a loop faster than every_s stays silent)
        if quiet or (now - last < every_s and not (i == total and printed)):
            continue
        last, elapsed, printed = now, now - start, True
        of = f"/{total}" if total else ""
        left = f", ~{_fmt(elapsed / i * (total - i))} left" if total and i < total else ""
        print(f"{label} {i}{of}, {_fmt(elapsed)} elapsed{left}", file=stream or sys.stderr, flush=True)
    if not quiet and total is None and printed:
        print(f"{label} {i} done, {_fmt(time.perf_counter() - start)} elapsed", file=stream or sys.stderr, flush=True)
