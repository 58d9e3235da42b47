"""Conventions shared by every file reader in `cwdpo.data` (Karpathy, NoCaps, TRL pairs,
MMBench/MMMU, image checks).

Why one module: a bad row must raise `DataError` naming file, row and field the same way in
every reader, and anything skipped on purpose must be logged with its count and added to the
caller's optional `stats` dict, never dropped silently. These helpers are that contract.
"""

from __future__ import annotations

import json
import logging
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from cwdpo.data.records import DataError

log = logging.getLogger(__name__)

Stats = MutableMapping[str, int]


def bump(stats: Stats | None, key: str, n: int = 1) -> None:
    """Add `n` to `stats[key]` when the caller asked for statistics."""
    if stats is not None:
        stats[key] = stats.get(key, 0) + n


def report_skipped(stats: Stats | None, key: str, n: int, where: Path | str, what: str) -> None:
    """Record and log a deliberate skip, so that no row ever disappears silently."""
    if n <= 0:
        return
    bump(stats, key, n)
    log.warning("%s: skipped %d %s", where, n, what)


def require_path(path: str | Path, what: str, *, directory: bool | None = None) -> Path:
    """Return `path` as a Path, or raise `DataError` naming it when it does not exist."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} not found: {p}")
    if directory is True and not p.is_dir():
        raise DataError(f"{what} is not a directory: {p}")
    if directory is False and not p.is_file():
        raise DataError(f"{what} is not a file: {p}")
    return p


def load_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file, turning I/O and syntax errors into `DataError` naming the file."""
    p = require_path(path, what, directory=False)
    try:
        with p.open(encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{p}: cannot parse {what} as JSON: {e}") from e


def bad_field(json_path: Path, where: str, field: str, expected: str, got: Any) -> DataError:
    """The reader error for one bad field: file, row (`where`), field, what was expected and
    (cut to 80 characters) what was found. Shared by the Karpathy and NoCaps readers."""
    got_s = repr(got)
    if len(got_s) > 80:
        got_s = got_s[:77] + "..."
    return DataError(f"{json_path}: {where}: field {field!r}: expected {expected}, got {got_s}")


def require_object(json_path: Path, where: str, row: Any) -> dict[str, Any]:
    """`row` itself when it is a JSON object, else the `<row>` field error."""
    if not isinstance(row, dict):
        raise bad_field(json_path, where, "<row>", "a JSON object", row)
    return row
