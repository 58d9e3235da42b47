"""Karpathy-split caption readers (COCO `dataset_coco.json`, Flickr30k `dataset_flickr30k.json`).

The Karpathy JSON is the split everyone reports COCO/Flickr captioning numbers on, so we read it
as-is instead of re-deriving splits. Images stay on disk (`ImageRef(path=...)`); only their
existence is checked here, so a wrong `image_root` fails at read time rather than mid-epoch.

Conventions shared by all readers in `cwdpo.data` (`cwdpo.data.reading`; see also `nocaps`,
`trl_pairs`, `multiple_choice`): bad rows raise `DataError` naming file, row and field; anything skipped on
purpose (`skip_bad_images=True`, open-ended MMMU rows...) is logged with its count and added to
the optional `stats` dict the caller passes in, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cwdpo.data.caption_files import CaptionRows, load_images_json
from cwdpo.data.reading import (
    Stats,
    bad_field,
    bump,
    require_object,
    require_path,
)
from cwdpo.data.records import CaptionRecord, DataError

KARPATHY_SPLITS = ("train", "restval", "val", "test")


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


def _check_splits(json_path: Path, splits: tuple[str, ...], fold_restval: bool) -> None:
    """Reject a requested split the file cannot have (restval only when not folded)."""
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


def _image_id(json_path: Path, i: int, row: dict[str, Any]) -> str:
    """`cocoid` when present (matches the official COCO annotations), else `imgid`."""
    if "cocoid" in row and row["cocoid"] is not None:
        return str(row["cocoid"])
    if "imgid" in row and row["imgid"] is not None:
        return str(row["imgid"])
    raise bad_field(json_path, _row(i, row), "imgid", "an image id (imgid or cocoid)", None)


def _validate_row(
    json_path: Path, i: int, row: Any, seen: dict[str, int]
) -> tuple[str, str, str, list[str]]:
    """(image id, file name, Karpathy split, references) of row `i`. Every row is validated,
    also those of splits nobody asked for, so a broken file fails whichever split is read."""
    require_object(json_path, _row(i, row), row)
    filename = row.get("filename")
    if not isinstance(filename, str) or not filename:
        raise bad_field(json_path, _row(i, row), "filename", "a non-empty file name", filename)
    orig_split = row.get("split")
    if orig_split not in KARPATHY_SPLITS:
        raise bad_field(json_path, _row(i, row), "split", f"one of {KARPATHY_SPLITS}", orig_split)
    image_id = _image_id(json_path, i, row)
    if image_id in seen:
        raise bad_field(
            json_path,
            _row(i, row),
            "cocoid/imgid",
            f"a unique id (also at images[{seen[image_id]}])",
            image_id,
        )
    seen[image_id] = i
    return image_id, filename, orig_split, _references(json_path, i, row)


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
    data = load_images_json(json_path, "Karpathy split file")
    dataset = str(data.get("dataset", ""))
    splits = tuple(splits)
    _check_splits(json_path, splits, fold_restval)

    rows = CaptionRows(json_path, skip_bad_images)
    seen: dict[str, int] = {}  # image id -> the row that has it
    for i, row in enumerate(data["images"]):
        image_id, filename, orig_split, refs = _validate_row(json_path, i, row, seen)
        split = "train" if (fold_restval and orig_split == "restval") else orig_split
        if split not in splits:
            continue
        meta: dict[str, Any] = {"dataset": dataset, "imgid": row.get("imgid"), "filename": filename}
        if orig_split != split:
            meta["karpathy_split"] = orig_split
        rows.add(
            f"images[{i}] (imgid={row.get('imgid')!r})",
            root / (row.get("filepath") or "") / filename,
            image_id=image_id,
            references=refs,
            split=split,
            meta=meta,
        )

    records = rows.finish(check_images, stats, "rows with missing images")
    for s in splits:
        if not any(r.split == s for r in records):
            raise DataError(
                f"{json_path}: requested split {s!r} has no rows"
                + (f" with an existing image ({rows.missing} skipped)" if rows.missing else "")
            )
    bump(stats, "records", len(records))
    return records
