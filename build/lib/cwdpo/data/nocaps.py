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

from cwdpo.data.caption_files import CaptionRows, load_images_json
from cwdpo.data.reading import Stats, bad_field, bump, require_object, require_path
from cwdpo.data.records import CaptionRecord, DataError

NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")


def _id_of(json_path: Path, where: str, row: Any, key: str) -> str:
    """The id field `key` of a JSON-object row, as a string (images and annotations alike)."""
    require_object(json_path, where, row)
    if row.get(key) is None:
        raise bad_field(json_path, where, key, "an image id", None)
    return str(row[key])


def _index_images(json_path: Path, images: list[Any]) -> dict[str, tuple[int, dict[str, Any]]]:
    """image id -> (row, image entry), in file order; ids unique, file name and domain valid."""
    out: dict[str, tuple[int, dict[str, Any]]] = {}
    for i, img in enumerate(images):
        image_id = _id_of(json_path, f"images[{i}]", img, "id")
        where = f"images[{i}] (id={image_id})"
        if image_id in out:
            raise bad_field(json_path, where, "id", "a unique image id", img["id"])
        fname = img.get("file_name")
        if not isinstance(fname, str) or not fname:
            raise bad_field(json_path, where, "file_name", "a non-empty file name", fname)
        if img.get("domain") not in NOCAPS_DOMAINS:
            raise bad_field(
                json_path, where, "domain", f"one of {NOCAPS_DOMAINS}", img.get("domain")
            )
        out[image_id] = (i, img)
    return out


def _references(json_path: Path, anns: list[Any], image_ids: Iterable[str]) -> dict[str, list[str]]:
    """image id -> its stripped captions. An annotation for an unknown image is an error: it
    would silently vanish from CIDEr."""
    refs: dict[str, list[str]] = {k: [] for k in image_ids}
    for j, ann in enumerate(anns):
        where = f"annotations[{j}]"
        image_id = _id_of(json_path, where, ann, "image_id")
        if image_id not in refs:
            raise bad_field(
                json_path, where, "image_id", "the id of an entry in 'images'", ann["image_id"]
            )
        cap = ann.get("caption")
        if not isinstance(cap, str) or not cap.strip():
            raise bad_field(json_path, where, "caption", "a non-empty caption string", cap)
        refs[image_id].append(cap.strip())
    return refs


def _wanted_domains(json_path: Path, domains: Iterable[str] | None) -> tuple[str, ...]:
    """The requested domains (default: all three), each a real NoCaps domain."""
    wanted = NOCAPS_DOMAINS if domains is None else tuple(domains)
    for d in wanted:
        if d not in NOCAPS_DOMAINS:
            raise DataError(f"{json_path}: requested domain {d!r} is not one of {NOCAPS_DOMAINS}")
    return wanted


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
    data = load_images_json(json_path, "NoCaps annotation file")
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise DataError(
            f"{json_path}: field 'annotations': expected a list, got {type(anns).__name__}"
        )
    wanted = _wanted_domains(json_path, domains)
    images = _index_images(json_path, data["images"])
    refs = _references(json_path, anns, images)

    rows = CaptionRows(json_path, skip_bad_images)
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
        meta: dict[str, Any] = {"domain": img["domain"]}
        if "open_images_id" in img:
            meta["open_images_id"] = img["open_images_id"]
        rows.add(
            f"images[{i}] (id={image_id})",
            root / img["file_name"],
            image_id=image_id,
            references=refs[image_id],
            split=split,
            meta=meta,
        )
    records = rows.finish(check_images, stats, "images that are missing")
    if not records:
        raise DataError(f"{json_path}: no images for domains {wanted}")
    bump(stats, "records", len(records))
    return records
