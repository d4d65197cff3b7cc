"""Shared helpers of the benchmarks (a folder, so ``make bench``'s ``benchmarks/*.py`` loop does not run it).

Every benchmark compares its variants side by side in one process, alternating repetitions (A B A B ...),
reports medians and ratios, prints a markdown table and writes it to ``benchmarks/results/<name>.md`` with a
header naming the date, CPU model, cores, torch version and thread count.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Every benchmark imports this module before torch: thread and tokenizer settings take effect, and the repository
# root is importable (common/, speculative/, ...).
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common.progress import progress  # noqa: E402 (step i/N and elapsed time on stderr)

THREADS = 2
# ADVLAB_BENCH_RESULTS redirects the reports (the tests run benchmarks into a temporary folder)
RESULTS = Path(os.environ.get("ADVLAB_BENCH_RESULTS") or Path(__file__).resolve().parent.parent / "results")


def setup_threads(n: int = THREADS) -> None:
    torch.set_num_threads(n)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def machine_header() -> str:
    dev = f"; GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n"
            f"- machine: {cpu_model()}, {os.cpu_count()} cores{dev}\n"
            f"- torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}\n"
            f"- load average (1, 5, 15 min) when written: {', '.join(f'{x:.2f}' for x in os.getloadavg())} "
            f"(above ~0 means other processes shared the {os.cpu_count()} cores during the run)\n")


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def alternate(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1, device=None,
              on_result: Callable[[str, object], None] | None = None) -> dict[str, list[float]]:
    """Run each of ``fns`` ``warmup`` times, then ``reps`` rounds A B A B ...; return seconds per call.
    ``on_result(name, value)`` sees every result (warm-ups included), e.g. to keep the last outputs."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(warmup):
        for k in names:
            out = fns[k]()
            if on_result:
                on_result(k, out)
            del out
    for _ in progress(range(reps), f"{', '.join(map(str, names))}: repetitions"):
        for k in names:
            sync(device)
            t0 = time.perf_counter()
            out = fns[k]()
            sync(device)
            times[k].append(time.perf_counter() - t0)
            if on_result:
                on_result(k, out)
            del out
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_result(name: str, title: str, body: str) -> Path:
    text = f"# {title}\n\n{machine_header()}\n{body}"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    print(f"written: {path}")
    return path


def fmt_s(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
