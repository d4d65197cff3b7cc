"""Shared support of the reproductions (a folder, so a loop over ``reproductions/*.py`` does not run it).

Every reproduction is a script that checks one paper claim at CPU scale and writes ``reports/<name>.md`` (setup,
a markdown table, a plot, the verdict) and ``reports/<name>.png``, then prints one verdict line
``<name>: claim reproduced|not reproduced: <numbers>``. What they all need is here, written once:

- the repository root on ``sys.path`` (``common``, ``retrieval``, ``speculative``, ... importable) and
  matplotlib's non-interactive ``Agg`` backend, both set on import: import this module before those packages;
- :func:`table` (a markdown table), :func:`save_plot` and :func:`write_report` (into ``REPORTS``),
- :func:`verdict` (the one-line verdict, printed),
- :func:`mean_sd`, :func:`fmt` and :func:`apart` (a mean ± sd over seeds, and whether two such intervals are
  disjoint).

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

__all__ = ["REPORTS", "ROOT", "apart", "fmt", "mean_sd", "plt", "save_plot", "table", "verdict", "write_report"]


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


def verdict(name: str, reproduced: bool, details: str, *, echo: bool = True) -> str:
    """The one-line verdict ``<name>: claim reproduced|not reproduced: <details>``, printed unless ``echo`` is False."""
    line = f"{name}: claim {'reproduced' if reproduced else 'not reproduced'}: {details}"
    if echo:
        print(line, flush=True)
    return line


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
