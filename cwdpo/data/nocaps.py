"""NoCaps reader (COCO-caption style JSON with an image `domain`).

NoCaps results are reported per domain (in/near/out-domain) as well as overall, so the domain
travels with every record in `meta["domain"]`. The test-split file ships without captions;
reading it needs `allow_no_references=True` so that a truncated val file is never mistaken
for the test set.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cwdpo.data.image_check import check_record_images
from cwdpo.data.karpathy import (
    Stats,
    bad_field,
    bump,
    load_json,
    report_skipped,
    require_path,
)
from cwdpo.data.records import CaptionRecord, DataError, ImageRef

NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")


def read_nocaps(
    json_path: str | Path,
    image_root: str | Path,
    domains: Iterable[str] | None = None,
    split: str = "val",
    *,
    allow_no_references: bool = False,
    skip_bad_images: bool = False,
    check_images: bool = False,
    stats: Stats | None = None,
) -> list[CaptionRecord]:
    """Read a NoCaps val/test JSON into one `CaptionRecord` per image, in file order.

    `domains` filters on `image["domain"]` (default: all three). Captions are stripped; an
    annotation for an unknown `image_id` is an error (it would silently vanish from CIDEr).
    Images without annotations are an error unless `allow_no_references` (test split).
    A missing image file raises `DataError` unless `skip_bad_images` (skips are logged and
    counted in `stats["skipped_missing_image"]`). `check_images` decodes every image now, as in
    `read_karpathy` (unreadable: `DataError` naming file, row and image, or a counted skip).
    """
    json_path = Path(json_path)
    root = require_path(image_root, "image root directory", directory=True)
    data = load_json(json_path, "NoCaps annotation file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{json_path}: expected a JSON object with an 'images' list")
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise DataError(
            f"{json_path}: field 'annotations': expected a list, got {type(anns).__name__}"
        )

    wanted = NOCAPS_DOMAINS if domains is None else tuple(domains)
    for d in wanted:
        if d not in NOCAPS_DOMAINS:
            raise DataError(f"{json_path}: requested domain {d!r} is not one of {NOCAPS_DOMAINS}")

    images: dict[str, tuple[int, dict[str, Any]]] = {}
    for i, img in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(img, dict):
            raise bad_field(json_path, where, "<row>", "a JSON object", img)
        if img.get("id") is None:
            raise bad_field(json_path, where, "id", "an image id", None)
        image_id = str(img["id"])
        where = f"images[{i}] (id={image_id})"
        if image_id in images:
            raise bad_field(json_path, where, "id", "a unique image id", img["id"])
        fname = img.get("file_name")
        if not isinstance(fname, str) or not fname:
            raise bad_field(json_path, where, "file_name", "a non-empty file name", fname)
        if img.get("domain") not in NOCAPS_DOMAINS:
            raise bad_field(
                json_path, where, "domain", f"one of {NOCAPS_DOMAINS}", img.get("domain")
            )
        images[image_id] = (i, img)

    refs: dict[str, list[str]] = {k: [] for k in images}
    for j, ann in enumerate(anns):
        where = f"annotations[{j}]"
        if not isinstance(ann, dict):
            raise bad_field(json_path, where, "<row>", "a JSON object", ann)
        if ann.get("image_id") is None:
            raise bad_field(json_path, where, "image_id", "an image id", None)
        image_id = str(ann["image_id"])
        if image_id not in refs:
            raise bad_field(
                json_path, where, "image_id", "the id of an entry in 'images'", ann["image_id"]
            )
        cap = ann.get("caption")
        if not isinstance(cap, str) or not cap.strip():
            raise bad_field(json_path, where, "caption", "a non-empty caption string", cap)
        refs[image_id].append(cap.strip())

    records: list[CaptionRecord] = []
    rows_of: list[str] = []  # "images[i] (id=...)" per record, for image errors
    missing = 0
    for image_id, (i, img) in images.items():
        if not refs[image_id] and not allow_no_references:
            raise bad_field(
                json_path,
                f"images[{i}] (id={image_id})",
                "annotations",
                "at least one caption for this image (pass allow_no_references=True for test)",
                [],
            )
        if img["domain"] not in wanted:
            continue
        path = root / img["file_name"]
        if not path.is_file():
            if skip_bad_images:
                missing += 1
                continue
            raise DataError(
                f"{json_path}: images[{i}] (id={image_id}): image file not found: {path}"
            )
        meta: dict[str, Any] = {"domain": img["domain"]}
        if "open_images_id" in img:
            meta["open_images_id"] = img["open_images_id"]
        records.append(
            CaptionRecord(
                image_id=image_id,
                image=ImageRef(path=str(path)),
                references=refs[image_id],
                split=split,
                meta=meta,
            )
        )
        rows_of.append(f"images[{i}] (id={image_id})")
    if check_images:
        records = check_record_images(
            records, rows_of, json_path, skip_bad_images=skip_bad_images, stats=stats
        )
    report_skipped(stats, "skipped_missing_image", missing, json_path, "images that are missing")
    if not records:
        raise DataError(f"{json_path}: no images for domains {wanted}")
    bump(stats, "records", len(records))
    return records
