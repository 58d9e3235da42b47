"""What the caption-file readers (`karpathy`, `nocaps`) share once a row is validated.

Why: both read a JSON object with an `images` list, turn each kept row into a `CaptionRecord`
with an image on disk, skip or reject a missing image file the same way, and decode every image
at read time when asked. One implementation keeps the two readers' errors and skip counts
identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cwdpo.data.image_check import check_record_images
from cwdpo.data.reading import Stats, load_json, report_skipped
from cwdpo.data.records import CaptionRecord, DataError, ImageRef


def load_images_json(json_path: Path, what: str) -> dict[str, Any]:
    """The parsed file, which must be a JSON object with an `images` list."""
    data = load_json(json_path, what)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{json_path}: expected a JSON object with an 'images' list")
    return data


@dataclass
class CaptionRows:
    """The records of one caption file, with each record's row label (for image errors) and the
    count of rows skipped because their image file is missing."""

    json_path: Path
    skip_bad_images: bool
    records: list[CaptionRecord] = field(default_factory=list)
    rows: list[str] = field(default_factory=list)
    missing: int = 0

    def add(self, row: str, path: Path, **record: Any) -> None:
        """Keep the record of `row` whose image is `path`; a missing file raises `DataError`
        naming file, row and path, or with `skip_bad_images` is counted and skipped."""
        if not path.is_file():
            if self.skip_bad_images:
                self.missing += 1
                return
            raise DataError(f"{self.json_path}: {row}: image file not found: {path}")
        self.records.append(CaptionRecord(image=ImageRef(path=str(path)), **record))
        self.rows.append(row)

    def finish(
        self, check_images: bool, stats: Stats | None, missing_what: str
    ) -> list[CaptionRecord]:
        """The records, minus undecodable images when `check_images` (see `check_record_images`);
        the missing-image skips are logged and counted in `stats["skipped_missing_image"]`."""
        records = self.records
        if check_images:
            records = check_record_images(
                records,
                self.rows,
                self.json_path,
                skip_bad_images=self.skip_bad_images,
                stats=stats,
            )
        report_skipped(stats, "skipped_missing_image", self.missing, self.json_path, missing_what)
        return records
