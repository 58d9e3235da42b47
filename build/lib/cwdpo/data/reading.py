"""Conventions shared by every file reader in `cwdpo.data` (Karpathy, NoCaps, TRL pairs,
MMBench/MMMU, image checks).

Why one module: a bad row must raise `DataError` naming file, row and field the same way in
every reader, and anything skipped on purpose must be logged with its count and added to the
caller's optional `stats` dict, never dropped silently. These helpers are that contract, with
the text and parquet plumbing under it: text is UTF-8 (a BOM is dropped, a byte that is not
UTF-8 is named by file, line and offset in one line), parquet is read a batch at a time and
its shards are picked by split as `datasets` names them.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
from collections.abc import Iterator, MutableMapping
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
        return json.loads(read_text(p))
    except (OSError, json.JSONDecodeError) as e:
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


# ------------------------------------------------------------------------------ UTF-8 text
_WIDE_BOMS = {
    codecs.BOM_UTF32_LE: "UTF-32",
    codecs.BOM_UTF32_BE: "UTF-32",
    codecs.BOM_UTF16_LE: "UTF-16",
    codecs.BOM_UTF16_BE: "UTF-16",
}


def _bom_length(head: bytes, path: Path) -> int:
    """Bytes of a UTF-8 BOM at the start of a file (0 or 3); a UTF-16/32 file is refused."""
    for bom, name in _WIDE_BOMS.items():  # UTF-32 first: its LE BOM begins with UTF-16's
        if head.startswith(bom):
            raise DataError(
                f"{path}: the file is {name} (byte-order mark {bom.hex()}); cwdpo reads text "
                f"files as UTF-8: re-encode it, e.g. iconv -f {name} -t UTF-8"
            )
    return len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0


def decode_utf8(data: bytes, path: Path | str, *, line: int = 1, offset: int = 0) -> str:
    """`data` (which starts at byte `offset`, line `line` of `path`) as text, or a one-line
    `DataError` naming the file, the line, the byte offset and the bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = line + data.count(b"\n", 0, e.start)
        start = max(data.rfind(b"\n", 0, e.start) + 1, e.start - 30)
        before = data[start : e.start].decode("utf-8", "replace")
        raise DataError(
            f"{path}: line {at}, byte {offset + e.start}: 0x{data[e.start : e.end].hex()} is not "
            f"UTF-8 ({e.reason}) after {before!r}; cwdpo reads text files as UTF-8 (with or "
            "without BOM): re-encode it, e.g. iconv -f latin1 -t utf-8"
        ) from None


def read_text(path: Path) -> str:
    """A whole UTF-8 text file (BOM dropped); bad bytes named as `decode_utf8` does."""
    data = path.read_bytes()
    skip = _bom_length(data[:4], path)
    return decode_utf8(data[skip:], path, offset=skip)


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file, read line by line (BOM dropped)."""
    with path.open("rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, start=1):
            skip = _bom_length(raw[:4], path) if lineno == 1 else 0
            yield lineno, decode_utf8(raw[skip:], path, line=lineno, offset=offset + skip)
            offset += len(raw)


# ------------------------------------------------------------------------------ parquet
#: File/folder-name keywords of each split, as `datasets` recognises them in a repo's files.
SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_KEYWORD_SPLIT = {k: s for s, ks in SPLIT_KEYWORDS.items() for k in ks}


def _split_of(rel: Path) -> str | None:
    """The split a shard's name gives (file name first, then its folders), else None."""
    for name in (rel.stem, *reversed(rel.parts[:-1])):
        for token in re.split(r"[-._ 0-9]+", name.lower()):
            if token in _KEYWORD_SPLIT:
                return _KEYWORD_SPLIT[token]
    return None


def parquet_files(path: Path, split: str) -> list[Path]:
    """`path` itself, or the `.parquet` shards of `split` under directory `path`, in name
    order (`data/train-00000-of-00002.parquet` ...). Shards whose names give no split are all
    "train", as `datasets` reads them; a mix of both is refused rather than guessed."""
    if path.is_file():
        return [path]
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise DataError(f"{path}: no .parquet files under it")
    splits = {f: _split_of(f.relative_to(path)) for f in files}
    named = sorted({s for s in splits.values() if s is not None})
    unnamed = [str(f.relative_to(path)) for f, s in splits.items() if s is None]
    if named and unnamed:
        raise DataError(
            f"{path}: parquet files {unnamed[:3]} name no split while others name {named}; "
            "point the data path at one split's files"
        )
    want = _KEYWORD_SPLIT.get(split.lower(), split)
    chosen = [f for f, s in splits.items() if (s or "train") == want]
    if not chosen:
        raise DataError(
            f"{path}: no split {split!r} in its parquet files; available: {named or ['train']}"
        )
    return chosen


def parquet_columns(path: Path) -> list[str]:
    """The column names of a parquet file (its schema only: no rows are read)."""
    import pyarrow.parquet as pq

    try:
        return list(pq.ParquetFile(path).schema_arrow.names)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError variants
        raise DataError(f"{path}: cannot read parquet: {type(e).__name__}: {e}") from e


def parquet_rows(path: Path, batch_size: int = 256) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row, row dict) of a parquet file, `batch_size` rows in memory at a time; binary cells
    (encoded images) stay bytes."""
    import pyarrow.parquet as pq

    i = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
            for row in batch.to_pylist():
                yield i, row
                i += 1
    except Exception as e:
        raise DataError(f"{path}: cannot read parquet at row {i}: {type(e).__name__}: {e}") from e
