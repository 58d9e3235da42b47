"""Decode every image when a dataset is read, in a bounded thread pool.

Why: readers used to check only that an image file exists, so a truncated or corrupt JPEG
surfaced mid-training as a DataLoader-worker traceback that named neither the annotation file
nor the row (and `skip_bad_images=true` did not skip it). Decoding is done at reduced scale
where the format allows it (JPEG `draft`: 1/8 size, the whole stream is still read, so a
truncated file fails), by a pool of at most `max_workers` threads (PIL releases the GIL while
decoding). The readers turn a failure into a `DataError` naming annotation file, row and image
path — or, with `skip_bad_images`, a logged and counted skip.
"""

from __future__ import annotations

import io
import os
from collections.abc import MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from cwdpo.data.pixels import rgb_pixels
from cwdpo.data.reading import report_skipped
from cwdpo.data.records import CaptionRecord, DataError, ImageRef

MAX_WORKERS = 8


def probe_image(ref: ImageRef) -> str | None:
    """None when the image decodes to the pixels `ImageRef.load` would give (EXIF turn, 16-bit
    scaling, RGB: `cwdpo.data.pixels`), else why not ("OSError: Truncated File Read", "PIL mode
    F (32-bit float pixels) has no standard 8-bit reading ...")."""
    try:
        if ref.factory is not None:
            rgb_pixels(ref.factory())
            return None
        src = io.BytesIO(ref.data) if ref.data is not None else ref.path
        if src is None:
            return "no path, data or factory"
        with Image.open(src) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
            rgb_pixels(im)
    except DataError as e:
        return str(e)
    except Exception as e:  # PIL raises many types for corrupt files
        return f"{type(e).__name__}: {e}"
    return None


def unreadable_images(refs: Sequence[ImageRef], max_workers: int | None = None) -> dict[int, str]:
    """{index: reason} of the images in `refs` that do not decode (bounded thread pool)."""
    if not refs:
        return {}
    workers = max(1, min(max_workers or MAX_WORKERS, (os.cpu_count() or 1) * 2, len(refs)))
    if workers == 1:
        reasons = [probe_image(r) for r in refs]
    else:
        with ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="cwdpo-image-check"
        ) as pool:
            reasons = list(pool.map(probe_image, refs))
    return {i: why for i, why in enumerate(reasons) if why is not None}


def check_record_images(
    records: list[CaptionRecord],
    rows: Sequence[str],
    source: str | Path,
    *,
    skip_bad_images: bool = False,
    stats: MutableMapping[str, int] | None = None,
) -> list[CaptionRecord]:
    """`records` minus those whose image does not decode (`skip_bad_images`: logged and counted
    in `stats["skipped_bad_image"]`), else `DataError` naming `source`, the row (`rows[i]`,
    e.g. "images[12] (imgid=7)") and the image path."""
    flat = [(k, ref) for k, r in enumerate(records) for ref in _images_of(r)]
    reasons = unreadable_images([ref for _, ref in flat])
    bad: dict[int, tuple[ImageRef, str]] = {}  # record index → its first unreadable image
    for j in sorted(reasons):
        bad.setdefault(flat[j][0], (flat[j][1], reasons[j]))
    if not bad:
        return records
    if not skip_bad_images:
        i = min(bad)
        img, why = bad[i]
        more = f" (and {len(bad) - 1} more row(s) with unreadable images)" if len(bad) > 1 else ""
        raise DataError(
            f"{source}: {rows[i]}: cannot read image {img.path or img.name or '<bytes>'}: {why}"
            f"{more}; fix or remove it, or set data.source.skip_bad_images=true to skip such rows"
        )
    report_skipped(stats, "skipped_bad_image", len(bad), source, "rows with unreadable images")
    return [r for k, r in enumerate(records) if k not in bad]


def _images_of(record: CaptionRecord) -> list[ImageRef]:
    """Every image of a row: `meta["images"]` for multi-image rows, else its one `image`."""
    many = record.meta.get("images") if isinstance(record.meta, dict) else None
    return [m for m in many if isinstance(m, ImageRef)] if many else [record.image]
