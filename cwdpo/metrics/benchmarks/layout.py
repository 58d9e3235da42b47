"""Where a benchmark's local files are (an explicit path per file, else the release's layout
under one root, `<task>.path=`, so one key points a task at a downloaded release) and how their
JSON is read: every error names the task, the file, the row and the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cwdpo.errors import DataError


def local_file(task: str, key: str, explicit: str | None, root: str | None, default: str) -> str:
    """`explicit` if given, else `root/default`; neither is an error naming both keys."""
    if explicit:
        return str(explicit)
    if root:
        return str(Path(root) / default)
    raise ValueError(
        f"{task}: give {key}= (a file) or path= (the release folder, {default} inside)"
    )


def read_json(task: str, path: str | Path, what: str, kind: type = object) -> Any:
    """The JSON in `path` (UTF-8); a missing, undecodable or non-`kind` file is a `DataError`."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{task}: {what} file not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{task}: {p} is not valid JSON: {e}") from None
    if not isinstance(data, kind):
        raise DataError(f"{task}: {p}: expected a JSON {kind.__name__} ({what})")
    return data


def row_field(task: str, row: Any, key: str, where: str, kind: type) -> Any:
    """`row[key]`, which must be a `kind` (a bool is no int); else a `DataError` naming it."""
    value = row.get(key) if isinstance(row, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{task}: {where}: field {key!r} is {value!r}; expected {kind.__name__}")
    return value
