"""Shared support of the reproductions (a folder, so a loop over ``reproductions/*.py`` does not run it).

Every reproduction is a script that checks one paper claim at CPU scale and writes ``reports/<name>.md`` (setup,
a markdown table, a plot, the verdict) and ``reports/<name>.png``, then prints one verdict line
``<name>: claim reproduced|not reproduced: <numbers>``. What they all need is here, written once:

- the repository root on ``sys.path`` (``common``, ``retrieval``, ``speculative``, ... importable) and
  matplotlib's non-interactive ``Agg`` backend, both set on import: import this module before those packages;
- :func:`smoke_args` (the ``--smoke`` command line most scripts share), :func:`table` (a markdown table), :func:`save_plot` and :func:`write_report` (into ``REPORTS``),
- :func:`verdict` (the one-line verdict, printed) and :func:`overall` (one verdict from the verdicts of a claim's parts),
- :func:`mean_sd`, :func:`fmt` and :func:`apart` (a mean ± sd over seeds, and whether two such intervals are
  disjoint),
- :func:`t975`, :func:`mean_ci` and :func:`diff_ci` (a two-sided 95% Student-t interval of a mean over seeds, and of
  a paired difference between two arms run on the same seeds), :func:`fmt_ci`, and :func:`wilson` (the Wilson
  interval of one accuracy over its evaluation items),
- :func:`preregistration` (the claim as a number, the matched control, and what counts as "not reproduced", written
  into the report before any result) and :func:`eval_record` (how an accuracy was measured, so that it can be
  compared: prompt template, answer extraction, EOS rule, sampling settings, split hash, seeds, device),
  :func:`split_hash`.

A script run as ``python reproductions/<name>.py`` has ``reproductions/`` on its path, so it imports
``from support.report import ...`` with no path manipulation of its own.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
REPORTS = ROOT / "reproductions" / "reports"

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402

__all__ = ["REPORTS", "ROOT", "VERDICTS", "apart", "diff_ci", "eval_record", "fmt", "fmt_ci", "mean_ci", "mean_sd", "overall", "plt",
           "preregistration", "save_plot", "smoke_args", "split_hash", "t975", "table", "verdict", "wilson", "write_report"]

VERDICTS = ("reproduced", "not reproduced", "inconclusive")


def smoke_args(doc: str | None, smoke_help: str, *, threads: int | None = 1) -> argparse.Namespace:
    """The command line of a reproduction whose one option is ``--smoke`` (help ``smoke_help``), described by the
    first line of its docstring ``doc``; then ``torch.set_num_threads(threads)`` unless ``threads`` is None (the
    toys' tensors are small: threads only add overhead, and one thread keeps the numbers the reports were made with)."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    args = ap.parse_args()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return args


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table: one header row, a separator and one line per row (cells formatted by ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(c) for c in row]
        if len(cells) != len(header):
            raise ValueError(f"table row {cells} has {len(cells)} cells for {len(header)} columns")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_plot(fig, name: str, out: Path = REPORTS, dpi: int = 100) -> Path:
    """Save ``fig`` as ``out/<name>.png`` (the folder is created) and close it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_report(name: str, markdown: str, out: Path = REPORTS) -> Path:
    """Write ``out/<name>.md`` (the folder is created)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.md"
    path.write_text(markdown)
    return path


def verdict(name: str, reproduced: bool | str, details: str, *, echo: bool = True) -> str:
    """The one-line verdict ``<name>: claim <verdict>: <details>``, printed unless ``echo`` is False.

    ``reproduced`` is a bool (reproduced / not reproduced) or one of :data:`VERDICTS` (``"inconclusive"`` included).
    """
    if isinstance(reproduced, str):
        if reproduced not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {reproduced!r}")
        word = reproduced
    else:
        word = "reproduced" if reproduced else "not reproduced"
    line = f"{name}: claim {word}: {details}"
    if echo:
        print(line, flush=True)
    return line


def overall(parts: Iterable[str]) -> str:
    """The verdict of a claim checked in parts (each one of :data:`VERDICTS`): *not reproduced* if any part is,
    *reproduced* if every part is, else *inconclusive*."""
    parts = list(parts)
    bad = [p for p in parts if p not in VERDICTS]
    if not parts or bad:
        raise ValueError(f"overall needs at least one part, each one of {VERDICTS}, got {parts!r}")
    if "not reproduced" in parts:
        return "not reproduced"
    return "reproduced" if all(p == "reproduced" for p in parts) else "inconclusive"


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (sd 0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_sd needs at least one value")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def fmt(values: Iterable[float], digits: int = 3) -> str:
    """``mean ± sd`` of ``values``."""
    m, s = mean_sd(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def apart(high: Iterable[float], low: Iterable[float]) -> bool:
    """The ±1 sd intervals do not overlap and ``high`` is above: mean(high) − sd(high) > mean(low) + sd(low)."""
    (mh, sh), (ml, sl) = mean_sd(high), mean_sd(low)
    return mh - sh > ml + sl


# Two-sided 95% quantiles of Student's t by degrees of freedom (df > 30: the normal's 1.960 is within 2%).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
         21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (1.960 beyond 30)."""
    if df < 1:
        raise ValueError(f"t975 needs df >= 1 (at least 2 seeds), got df={df}")
    return _T975.get(int(df), 1.960)


def mean_ci(values: Iterable[float], *, one_seed_half: float | None = None) -> tuple[float, float, float]:
    """Mean and the two-sided 95% Student-t interval over seeds: ``(mean, low, high)``; needs >= 2 values.

    ``half = t975(n - 1) * sd / sqrt(n)``, the interval of the mean of ``n`` independent seeds. A single value (a
    one-seed smoke run) raises, unless ``one_seed_half`` is given: then ``(v, v - one_seed_half, v + one_seed_half)``
    (``0.0``: the point itself; ``math.nan``: no interval).
    """
    vals = [float(v) for v in values]
    if len(vals) == 1 and one_seed_half is not None:
        return vals[0], vals[0] - one_seed_half, vals[0] + one_seed_half
    if len(vals) < 2:
        raise ValueError(f"mean_ci needs at least 2 values (seeds), got {len(vals)}")
    m, s = mean_sd(vals)
    half = t975(len(vals) - 1) * s / len(vals) ** 0.5
    return m, m - half, m + half


def diff_ci(a: Sequence[float], b: Sequence[float], *, one_seed_half: float | None = None) -> tuple[float, float, float]:
    """Paired difference ``a - b`` over the same seeds (arm ``a`` and its control ``b`` run with seed i each):
    ``mean_ci([a_i - b_i], one_seed_half=one_seed_half)``."""
    if len(a) != len(b):
        raise ValueError(f"diff_ci needs the same seeds in both arms, got {len(a)} and {len(b)} values")
    return mean_ci([float(x) - float(y) for x, y in zip(a, b)], one_seed_half=one_seed_half)


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval ``(low, high)`` of a proportion ``p`` observed over ``n`` trials (an accuracy on
    ``n`` evaluation items, one seed); ``(0, 1)`` for ``n <= 0``. ``z`` = the normal's 0.975 quantile."""
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def fmt_ci(ci: tuple[float, float, float], digits: int = 3, signed: bool = False) -> str:
    """``m [low, high]`` of a :func:`mean_ci` / :func:`diff_ci` result (``+`` signs with ``signed``)."""
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f"{f.format(ci[0])} [{f.format(ci[1])}, {f.format(ci[2])}]"


def preregistration(*, claim: str, control: str, not_reproduced_if: str, seeds: Sequence[int] | str,
                    inconclusive_if: str = "") -> str:
    """The report's "Pre-registered" section: the paper's claim as a number, the matched control, the seeds, and the
    outcomes that count as *not reproduced* (and *inconclusive*), fixed in the script before any result is computed."""
    for arg, val in (("claim", claim), ("control", control), ("not_reproduced_if", not_reproduced_if)):
        if not val.strip():
            raise ValueError(f"preregistration needs a non-empty {arg}")
    lines = ["## Pre-registered (written in the script before the run)", "",
             f"- **Claim:** {claim}", f"- **Matched control:** {control}",
             f"- **Seeds:** {seeds if isinstance(seeds, str) else ', '.join(str(s) for s in seeds)}",
             f"- **Not reproduced if:** {not_reproduced_if}"]
    if inconclusive_if:
        lines.append(f"- **Inconclusive if:** {inconclusive_if}")
    return "\n".join(lines) + "\n"


def split_hash(items: Iterable[object]) -> str:
    """First 12 hex digits of the SHA-256 of the evaluation split (items serialised as sorted-key JSON, in order)."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:12]


def eval_record(*, task: str, prompt_template: str, answer_extraction: str, eos_rule: str, sampling: str,
                split: str, seeds: Sequence[int] | str, device: str = "", **extra: object) -> str:
    """The report's "Evaluation record": what an accuracy means (papers and peers differ in each of these, so their
    numbers cannot be compared without it). ``device`` defaults to this machine (CPU model and core count)."""
    import os

    device = device or f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch CPU"
    rows = [("task", task), ("prompt template", prompt_template), ("answer extraction", answer_extraction),
            ("EOS rule", eos_rule), ("sampling", sampling), ("evaluation split", split),
            ("seeds", seeds if isinstance(seeds, str) else ", ".join(str(s) for s in seeds)), ("device", device)]
    rows += [(k.replace("_", " "), v) for k, v in extra.items()]
    return "## Evaluation record\n\n" + table(["field", "value"], rows) + "\n"
