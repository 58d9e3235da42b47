"""TRL-style preference pairs (JSONL, parquet, or a local HF `datasets` directory) ->
`PreferenceRecord`.

TRL's vision DPO datasets (e.g. `trl-lib/rlaif-v`) have columns `images` (or `image`), `prompt`,
`chosen`, `rejected`, where the texts are plain strings or conversational message lists; the
original `openbmb/RLAIF-V-Dataset` has `image`, `question`, `chosen`, `rejected` (+ `ds_name`,
`origin_dataset`, `origin_split`, `idx`, `image_path`), so `question` is read as the prompt. We
read every form into plain text so that a pair means the same thing whichever format it came in,
and keep the original prompt messages in `meta["prompt_messages"]` for chat templating.

JSONL is UTF-8 with or without BOM (`cwdpo.data.reading.text_lines`). Parquet files and HF
datasets are read through Arrow a batch at a time without decoding images: encoded bytes go into
`ImageRef(data=...)` and are only decoded when a batch (or the read-time image check) needs them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from cwdpo.data.reading import (
    Stats,
    bump,
    parquet_columns,
    parquet_files,
    parquet_rows,
    read_text,
    report_skipped,
    require_path,
    text_lines,
)
from cwdpo.data.records import DataError, ImageRef, PreferenceRecord

TEXT_COLUMNS = ("prompt", "chosen", "rejected")
_ID_COLUMNS = ("image_id", "id", "idx")
#: Rows as (file or dataset name, row in it, row).
Rows = Iterator[tuple[str, int, Any]]
_SAVED_DATASET_FILES = ("dataset_dict.json", "state.json", "dataset_info.json")


class _MissingImage(Exception):
    """An image path that does not exist (skippable with `skip_bad_images`)."""


def message_text(value: Any, where: str) -> str:
    """Plain text of a string or a conversational message list (image parts are dropped).

    Messages are `{"role", "content"}` with `content` a string or a list of parts
    `{"type": "text", "text": ...}` / `{"type": "image"}`; text pieces are joined by newlines.
    """
    if isinstance(value, str):
        return value.strip()
    if not isinstance(value, list):
        raise DataError(
            f"{where}: expected a string or a list of messages, got {type(value).__name__}"
        )
    pieces: list[str] = []
    for m, msg in enumerate(value):
        if not isinstance(msg, dict) or "content" not in msg:
            raise DataError(
                f"{where}[{m}]: expected a message {{'role', 'content'}}, got {msg!r:.80}"
            )
        content = msg["content"]
        if isinstance(content, str):
            pieces.append(content.strip())
            continue
        if not isinstance(content, list):
            raise DataError(
                f"{where}[{m}].content: expected a string or a list of parts, got {content!r:.80}"
            )
        for p, part in enumerate(content):
            if isinstance(part, str):
                pieces.append(part.strip())
            elif not isinstance(part, dict):
                raise DataError(
                    f"{where}[{m}].content[{p}]: expected a part dict, got {part!r:.80}"
                )
            elif part.get("type", "text") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise DataError(
                        f"{where}[{m}].content[{p}].text: expected a string, got {text!r:.80}"
                    )
                pieces.append(text.strip())
            # other part types ("image", "video"...) carry no text
    return "\n".join(p for p in pieces if p)


def _resolve(value: str, base: Path, where: str) -> ImageRef:
    p = Path(value)
    if not p.is_absolute():
        p = base / p
    if not p.is_file():
        raise _MissingImage(f"{where}: image file not found: {p}")
    return ImageRef(path=str(p))


def _image_refs(value: Any, base: Path, where: str) -> list[ImageRef]:
    items = value if isinstance(value, list | tuple) else ([] if value is None else [value])
    refs = []
    for k, item in enumerate(items):
        w = f"{where}[{k}]"
        if isinstance(item, Image.Image):
            refs.append(ImageRef(factory=lambda im=item: im, name=w))
        elif isinstance(item, dict):
            if item.get("bytes") is not None:
                refs.append(
                    ImageRef(data=bytes(item["bytes"]), name=f"{w} ({item.get('path') or 'bytes'})")
                )
            elif isinstance(item.get("path"), str) and item["path"]:
                refs.append(_resolve(item["path"], base, w))
            else:
                raise DataError(
                    f"{w}: expected an image dict with 'bytes' or 'path', got {item!r:.80}"
                )
        elif isinstance(item, str) and item:
            refs.append(_resolve(item, base, w))
        else:
            raise DataError(
                f"{w}: expected a PIL image, a {{'bytes','path'}} dict or a path, got {item!r:.80}"
            )
    return refs


def _iter_jsonl(path: Path) -> Rows:
    name = str(path)
    if path.suffix == ".json":  # a single JSON list of rows is accepted too
        try:
            rows = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: cannot parse JSON: {e}") from e
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        yield from ((name, i, row) for i, row in enumerate(rows))
        return
    row = 0
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            yield name, row, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno} (row {row}): invalid JSON: {e}") from e
        row += 1


def _check_columns(cols: list[str], where: str) -> None:
    """TRL's columns (`images`/`image`, `prompt`, `chosen`, `rejected`) or RLAIF-V's
    (`image`, `question`, `chosen`, `rejected`), else `DataError` listing what was found."""
    missing = [c for c in ("chosen", "rejected") if c not in cols]
    if "prompt" not in cols and "question" not in cols:
        missing.insert(0, "prompt")
    if "images" not in cols and "image" not in cols:
        missing.insert(0, "images")
    if missing:
        raise DataError(
            f"{where}: missing column(s) {missing}; expected 'images' (or 'image'), 'prompt' (or "
            f"'question', as RLAIF-V), 'chosen', 'rejected', found {sorted(cols)}"
        )


def _iter_hf(ds: Any, where: str) -> Rows:
    _check_columns(list(ds.column_names), where)
    i = 0
    # Arrow format: images arrive as {'bytes', 'path'} dicts, no PIL decoding of the whole set.
    for batch in ds.with_format("arrow").iter(batch_size=256):
        for row in batch.to_pylist():
            yield where, i, row
            i += 1


def _iter_parquet(files: list[Path]) -> Rows:
    """Each shard's columns checked before its rows are read; rows named by shard and row."""
    for f in files:
        _check_columns(parquet_columns(f), str(f))
        yield from ((str(f), i, row) for i, row in parquet_rows(f))


def _open(path: Any, split: str) -> tuple[Rows, str, Path]:
    """Rows, a name for messages, and the base directory for relative image paths."""
    if not isinstance(path, str | Path):  # an in-memory datasets.Dataset / DatasetDict
        ds = path
        if hasattr(ds, "keys") and not hasattr(ds, "column_names"):
            if split not in ds:
                raise DataError(
                    f"<DatasetDict>: no split {split!r}; available: {sorted(ds.keys())}"
                )
            ds = ds[split]
        return _iter_hf(ds, "<Dataset>"), "<Dataset>", Path.cwd()
    p = require_path(path, "preference data")
    if p.is_file() and p.suffix != ".parquet":
        return _iter_jsonl(p), str(p), p.parent
    if p.is_file() or not any((p / f).is_file() for f in _SAVED_DATASET_FILES):
        if p.is_dir() and not any(p.rglob("*.parquet")):
            raise DataError(
                f"{p}: not a JSONL file, a parquet file or a directory of parquet shards, or a "
                "`save_to_disk` dataset directory"
            )
        return _iter_parquet(parquet_files(p, split)), str(p), p if p.is_dir() else p.parent
    import datasets  # local import: datasets is heavy and only needed for this branch

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # datasets raises FileNotFoundError / ValueError variants
        raise DataError(f"{p}: cannot load the `save_to_disk` dataset directory: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{p}: no split {split!r}; available: {sorted(ds.keys())}")
        ds = ds[split]
    return _iter_hf(ds, str(p)), str(p), p


def _row_images(row: dict[str, Any], where: str, base: Path) -> tuple[str, list[ImageRef]]:
    """(the image column, its images); `_MissingImage` for an image path that does not exist."""
    for col in TEXT_COLUMNS:
        if col not in row:
            raise DataError(f"{where}: missing field {col!r} (expected {TEXT_COLUMNS} + 'images')")
    img_col = "images" if "images" in row else "image" if "image" in row else None
    if img_col is None:
        raise DataError(f"{where}: missing field 'images' (or 'image')")
    images = _image_refs(row[img_col], base, f"{where}: field {img_col!r}")
    if not images:
        raise DataError(
            f"{where}: field {img_col!r}: expected at least one image, got {row[img_col]!r:.80}"
        )
    return img_col, images


def _row_texts(row: dict[str, Any], where: str) -> dict[str, str]:
    """Plain prompt/chosen/rejected; the responses non-empty and different from each other."""
    texts = {c: message_text(row[c], f"{where}: field {c!r}") for c in TEXT_COLUMNS}
    for c in ("chosen", "rejected"):
        if not texts[c]:
            raise DataError(
                f"{where}: field {c!r}: expected a non-empty response, got {row[c]!r:.80}"
            )
    if texts["chosen"] == texts["rejected"]:
        raise DataError(
            f"{where}: field 'rejected': expected a response different from 'chosen', "
            f"both are {texts['chosen']!r:.80}"
        )
    return texts


def _row_meta(
    row: dict[str, Any], i: int, name: str, img_col: str, images: list[ImageRef]
) -> dict[str, Any]:
    """Row, file, the row's other scalar columns, prompt messages and (several) images."""
    meta: dict[str, Any] = {"row": i, "file": name}
    for k, v in row.items():
        if k not in (*TEXT_COLUMNS, img_col) and isinstance(v, str | int | float | bool):
            meta[k] = v
    if isinstance(row["prompt"], list):
        meta["prompt_messages"] = row["prompt"]
    if len(images) > 1:
        meta["images"] = images
    meta["num_images"] = len(images)
    return meta


def _row_image_id(row: dict[str, Any], img_col: str, stem: str, i: int) -> str:
    """An id column, else the first image's path (it names itself), else "<stem>:<row>"."""
    image_id = next((str(row[c]) for c in _ID_COLUMNS if row.get(c) is not None), None)
    if image_id is None:
        first = row[img_col][0] if isinstance(row[img_col], list) else row[img_col]
        image_id = first if isinstance(first, str) else f"{stem}:{i}"
    return image_id


def _pair(row: Any, i: int, name: str, base: Path) -> PreferenceRecord:
    """Row `i` of `name` as a pair, checked in file order: object, columns, images, texts."""
    where = f"{name}: row {i}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "prompt" not in row and "question" in row:  # RLAIF-V's name for the prompt
        row = {("prompt" if k == "question" else k): v for k, v in row.items()}
    stem = Path(name).stem if name != "<Dataset>" else "dataset"
    img_col, images = _row_images(row, where, base)
    texts = _row_texts(row, where)
    return PreferenceRecord(
        image_id=_row_image_id(row, img_col, stem, i),
        image=images[0],
        prompt=texts["prompt"],
        chosen=texts["chosen"],
        rejected=texts["rejected"],
        source="trl",
        meta=_row_meta(row, i, name, img_col, images),
    )


def read_preference_pairs(
    path: str | Path | Any,
    image_root: str | Path | None = None,
    *,
    split: str = "train",
    skip_bad_images: bool = False,
    stats: Stats | None = None,
) -> list[PreferenceRecord]:
    """Read TRL-style preference rows into `PreferenceRecord`s (`source="trl"`).

    `path`: a `.jsonl` (or `.json` list) file (UTF-8, BOM or not), a `.parquet` file, a
    directory of parquet shards (a hub dataset's files: `data/<split>-0000k-of-0000n.parquet`
    give `split`; shards naming no split are all "train"), a `save_to_disk` directory (Dataset,
    or DatasetDict from which `split` is taken), or an in-memory Dataset/DatasetDict.
    Images: `images` (a list) or `image`; PIL images, `{"bytes", "path"}` dicts or path strings,
    relative paths resolved against `image_root` (default: the file's directory). The first image
    is the record's image; when a row has several, all are kept in `meta["images"]` and all are
    fed to the model (`cwdpo.data.records.load_images`).
    `image_id` comes from an `image_id`/`id`/`idx` column, else the image path, else
    "<stem>:<row>". Errors (missing column, no image, empty or identical chosen/rejected) raise
    `DataError` naming file, row and field; missing image files raise too unless
    `skip_bad_images` (then logged and counted in `stats["skipped_missing_image"]`).
    """
    rows, name, base = _open(path, split)
    if image_root is not None:
        base = require_path(image_root, "image root directory", directory=True)

    out: list[PreferenceRecord] = []
    missing = 0
    for where, i, row in rows:
        try:
            out.append(_pair(row, i, where, base))
        except _MissingImage as e:
            if not skip_bad_images:
                raise DataError(str(e)) from None
            missing += 1
    report_skipped(stats, "skipped_missing_image", missing, name, "rows with missing images")
    multi = sum(p.meta["num_images"] > 1 for p in out)
    if multi:
        bump(stats, "multi_image_rows", multi)
    if not out:
        raise DataError(f"{name}: no preference rows")
    bump(stats, "records", len(out))
    return out
