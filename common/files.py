"""Reading a local table (.jsonl / .json / .parquet) into rows: one reader for every file a recipe names (task
sources, SFT records). Nothing is downloaded and nothing is cached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a local ``.jsonl`` (one JSON object a line), ``.json`` (a list of objects, or JSON lines) or
    ``.parquet`` file, as dicts. Nothing is downloaded and nothing is cached. A missing, unreadable or empty file, or
    a row that is not an object, is a one-line ValueError naming the file (and the line)."""
    path = Path(path).expanduser()
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"path {str(path)!r} must end in .jsonl, .json or .parquet")
    if not path.is_file():
        raise ValueError(f"path {str(path)!r} does not exist" if not path.exists() else f"path {str(path)!r} is not a file")
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as err:  # noqa: BLE001 - an OSError, or pyarrow's ArrowInvalid & co. on a file that is not parquet
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{path} is not a readable parquet file: {first}") from None
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(f"cannot read {path}: {err.strerror or err}") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        rows = _json_rows(path, text, kind)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{path} row {number} is {type(row).__name__}, expected an object with named columns")
    return rows


def _json_rows(path: Path, text: str, kind: str) -> list[Any]:
    import json

    if kind == "json" and text.lstrip().startswith("["):  # one JSON array of objects
        try:
            return list(json.loads(text))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number} is not valid JSON ({err.msg}); expected one JSON object a "
                                 "line") from None
    return rows
