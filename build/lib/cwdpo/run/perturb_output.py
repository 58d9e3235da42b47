"""The perturbation builder's files: append-only pairs, a ledger of dropped rows, the summary.

Why append-only: building negatives through a paid API or a shared server takes hours, and a
crash, a kill or a pre-empted job must cost at most the requests in flight. Every finished row
is one JSON line, written and flushed as soon as it is known; a rerun reads the keys already
there (kept pairs in `<name>.jsonl`, rows dropped after validation in `<name>.dropped.jsonl`)
and skips them. A last line cut by a crash mid-write is removed before appending (the row is
simply redone); any other unreadable line is an error naming file and line, never guessed at.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from cwdpo.errors import DataError

log = logging.getLogger(__name__)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of an append-only JSONL file, after cutting a partial last line off it."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    keep = raw if raw.endswith(b"\n") or not raw else raw[: raw.rfind(b"\n") + 1]
    if len(keep) != len(raw):
        log.warning(
            "%s: removed a partial last line (%d bytes, a crash mid-write); that row is redone",
            path,
            len(raw) - len(keep),
        )
        with path.open("r+b") as f:
            f.truncate(len(keep))
    rows = []
    for lineno, line in enumerate(keep.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno}: invalid JSON ({e}); fix or remove it") from e
        if not isinstance(row, dict) or not isinstance(row.get("key"), str):
            raise DataError(
                f"{path}: line {lineno}: expected an object with a 'key', got {line:.80}"
            )
        rows.append(row)
    return rows


class PairOutput:
    """`path` (kept pairs, TRL-style JSONL), `<stem>.dropped.jsonl`, `<stem>.summary.json` and
    `<stem>_images/` (images that had no file of their own), all for one input file."""

    def __init__(self, path: str | Path, input_file: str) -> None:
        self.path = Path(path)
        stem = self.path.with_suffix("")
        self.dropped_path = stem.with_name(stem.name + ".dropped.jsonl")
        self.summary_path = stem.with_name(stem.name + ".summary.json")
        self.image_dir = stem.with_name(stem.name + "_images")
        self.input_file = input_file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.kept: dict[str, int] = {}  # key -> line, for the duplicate check
        self.dropped: set[str] = set()
        for file, into in ((self.path, self.kept), (self.dropped_path, self.dropped)):
            for i, row in enumerate(_read_rows(file), start=1):
                self._check_row(file, i, row)
                if isinstance(into, dict):
                    into[row["key"]] = i
                else:
                    into.add(row["key"])
        self._files: dict[Path, Any] = {}

    def _check_row(self, file: Path, i: int, row: dict[str, Any]) -> None:
        """A row of another input, or one written twice, means the output is not this run's."""
        src = row.get("source", {}).get("file") if isinstance(row.get("source"), dict) else None
        if src != self.input_file:
            raise DataError(
                f"{file}: row {i} was built from {src!r}, not from {self.input_file!r}: "
                "choose another perturb.output (or the input it was built from)"
            )
        if row["key"] in self.kept or row["key"] in self.dropped:
            raise DataError(f"{file}: row {i}: key {row['key']!r} is there twice")

    @property
    def done(self) -> set[str]:
        return set(self.kept) | self.dropped

    def _append(self, path: Path, row: dict[str, Any]) -> None:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = path.open("a", encoding="utf-8")
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()  # in the OS's hands now: a killed process loses nothing written

    def write_pair(self, row: dict[str, Any]) -> None:
        self._append(self.path, row)
        self.kept[row["key"]] = len(self.kept) + 1

    def write_dropped(self, key: str, reason: str, detail: dict[str, Any]) -> None:
        self._append(self.dropped_path, {"key": key, "reason": reason, **detail})
        self.dropped.add(key)

    def close(self) -> None:
        for f in self._files.values():
            try:
                f.flush()
                os.fsync(f.fileno())
            finally:
                f.close()
        self._files.clear()
