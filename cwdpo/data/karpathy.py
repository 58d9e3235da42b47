"""Karpathy-split caption readers (COCO `dataset_coco.json`, Flickr30k `dataset_flickr30k.json`).

The Karpathy JSON is the split everyone reports COCO/Flickr captioning numbers on, so we read it
as-is instead of re-deriving splits. Images stay on disk (`ImageRef(path=...)`); only their
existence is checked here, so a wrong `image_root` fails at read time rather than mid-epoch.

Conventions shared by all readers in `cwdpo.data` (see also `nocaps`, `trl_pairs`,
`multiple_choice`): bad rows raise `DataError` naming file, row and field; anything skipped on
purpose (`skip_bad_images=True`, open-ended MMMU rows...) is logged with its count and added to
the optional `stats` dict the caller passes in, never dropped silently.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from typing import Any

from cwdpo.data.image_check import check_record_images
from cwdpo.data.records import CaptionRecord, DataError, ImageRef

log = logging.getLogger(__name__)

KARPATHY_SPLITS = ("train", "restval", "val", "test")

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


def _row(i: int, row: Any) -> str:
    ident = f" (imgid={row['imgid']!r})" if isinstance(row, dict) and "imgid" in row else ""
    return f"images[{i}]{ident}"


def _references(json_path: Path, i: int, row: dict[str, Any]) -> list[str]:
    sents = row.get("sentences")
    if not isinstance(sents, list) or not sents:
        raise bad_field(
            json_path, _row(i, row), "sentences", "a non-empty list of {'raw': str, ...}", sents
        )
    refs = []
    for j, s in enumerate(sents):
        raw = s.get("raw") if isinstance(s, dict) else None
        if not isinstance(raw, str):
            raise bad_field(json_path, _row(i, row), f"sentences[{j}].raw", "a caption string", raw)
        raw = raw.strip()
        if not raw:
            raise bad_field(
                json_path, _row(i, row), f"sentences[{j}].raw", "a non-empty caption", s["raw"]
            )
        refs.append(raw)
    return refs


def read_karpathy(
    json_path: str | Path,
    image_root: str | Path,
    splits: Iterable[str] = ("train",),
    fold_restval: bool = True,
    *,
    skip_bad_images: bool = False,
    check_images: bool = False,
    stats: Stats | None = None,
) -> list[CaptionRecord]:
    """Read a Karpathy split file into one `CaptionRecord` per image of the requested splits.

    - `restval` is folded into `train` when `fold_restval` (the customary 113k COCO train set);
      the original split is kept in `meta["karpathy_split"]`.
    - Image ids are `cocoid` when present (COCO, matches the official annotations and CIDEr
      references), else `imgid`; always strings.
    - References are the stripped `raw` sentences (tokens are ignored: metrics re-tokenise).
    - Image path is `image_root/filepath/filename` (`filepath` is optional, e.g. "val2014").
    - Every row is validated, but only rows of the requested splits are returned.
    - A missing image raises `DataError`, unless `skip_bad_images`: then the row is skipped, the
      count is logged and added to `stats["skipped_missing_image"]`.
    - `check_images`: every image is decoded now (`cwdpo.data.image_check`, a bounded thread
      pool); an unreadable one raises `DataError` naming file, row and image, or with
      `skip_bad_images` is skipped and counted in `stats["skipped_bad_image"]`.
    """
    json_path = Path(json_path)
    root = require_path(image_root, "image root directory", directory=True)
    data = load_json(json_path, "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{json_path}: expected a JSON object with an 'images' list")
    dataset = str(data.get("dataset", ""))

    splits = tuple(splits)
    allowed = ("train", "val", "test") if fold_restval else KARPATHY_SPLITS
    for s in splits:
        if s not in allowed:
            raise DataError(
                f"{json_path}: requested split {s!r} is not one of {allowed}"
                + (
                    " (restval is folded into train; pass fold_restval=False)"
                    if s == "restval"
                    else ""
                )
            )

    records: list[CaptionRecord] = []
    rows_of: list[str] = []  # "images[i] (imgid=...)" per record, for image errors
    seen: dict[str, int] = {}
    missing = 0
    for i, row in enumerate(data["images"]):
        if not isinstance(row, dict):
            raise bad_field(json_path, _row(i, row), "<row>", "a JSON object", row)
        filename = row.get("filename")
        if not isinstance(filename, str) or not filename:
            raise bad_field(json_path, _row(i, row), "filename", "a non-empty file name", filename)
        orig_split = row.get("split")
        if orig_split not in KARPATHY_SPLITS:
            raise bad_field(
                json_path, _row(i, row), "split", f"one of {KARPATHY_SPLITS}", orig_split
            )
        if "cocoid" in row and row["cocoid"] is not None:
            image_id = str(row["cocoid"])
        elif "imgid" in row and row["imgid"] is not None:
            image_id = str(row["imgid"])
        else:
            raise bad_field(json_path, _row(i, row), "imgid", "an image id (imgid or cocoid)", None)
        if image_id in seen:
            raise bad_field(
                json_path,
                _row(i, row),
                "cocoid/imgid",
                f"a unique id (also at images[{seen[image_id]}])",
                image_id,
            )
        seen[image_id] = i
        refs = _references(json_path, i, row)

        split = "train" if (fold_restval and orig_split == "restval") else orig_split
        if split not in splits:
            continue
        filepath = row.get("filepath") or ""
        img_path = root / filepath / filename
        if not img_path.is_file():
            if skip_bad_images:
                missing += 1
                continue
            raise DataError(
                f"{json_path}: images[{i}] (imgid={row.get('imgid')!r}): image file not found: "
                f"{img_path}"
            )
        meta: dict[str, Any] = {"dataset": dataset, "imgid": row.get("imgid"), "filename": filename}
        if orig_split != split:
            meta["karpathy_split"] = orig_split
        records.append(
            CaptionRecord(
                image_id=image_id,
                image=ImageRef(path=str(img_path)),
                references=refs,
                split=split,
                meta=meta,
            )
        )
        rows_of.append(f"images[{i}] (imgid={row.get('imgid')!r})")

    if check_images:
        records = check_record_images(
            records, rows_of, json_path, skip_bad_images=skip_bad_images, stats=stats
        )
    report_skipped(stats, "skipped_missing_image", missing, json_path, "rows with missing images")
    for s in splits:
        if not any(r.split == s for r in records):
            raise DataError(
                f"{json_path}: requested split {s!r} has no rows"
                + (f" with an existing image ({missing} skipped)" if missing else "")
            )
    bump(stats, "records", len(records))
    return records
