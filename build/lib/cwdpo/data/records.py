"""Record types: the one vocabulary every reader produces and every collator consumes.

Readers (ShapesWorld, Karpathy, NoCaps, TRL pairs, MMBench, MMMU) turn files into these
records; negative sources turn caption records into preference records. Images are held
as an `ImageRef` so that a dataset of 100k images costs nothing until a batch asks for them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from cwdpo.data.pixels import rgb_pixels
from cwdpo.errors import DataError


def normalize(text: str) -> str:
    """Case-, punctuation- and whitespace-insensitive form used to compare captions."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@dataclass(frozen=True)
class ImageRef:
    """A lazily loaded image: a path on disk, encoded bytes, or an in-memory factory.

    `load()` returns an upright 8-bit RGB `PIL.Image` (EXIF orientation applied as transformers'
    `load_image` does, 16-bit greyscale scaled: `cwdpo.data.pixels`); a missing or corrupt file,
    or a pixel mode with no 8-bit reading, raises `DataError` naming the image (never a raw PIL
    traceback).
    """

    path: str | None = None
    data: bytes | None = None
    factory: Callable[[], Image.Image] | None = None
    name: str = ""

    def load(self) -> Image.Image:
        where = self.name or self.path or "<in-memory image>"
        try:
            if self.factory is not None:
                img = self.factory()
            elif self.data is not None:
                import io

                img = Image.open(io.BytesIO(self.data))
                img.load()
            elif self.path is not None:
                if not Path(self.path).is_file():
                    raise DataError(f"image file not found: {self.path}")
                with Image.open(self.path) as f:
                    f.load()
                    img = f.copy()
            else:
                raise DataError(f"image reference {where!r} has no path, data or factory")
            return rgb_pixels(img, f"image {where}")
        except DataError:
            raise
        except Exception as e:  # PIL raises many types for corrupt files
            raise DataError(f"cannot read image {where}: {type(e).__name__}: {e}") from e

    def size(self) -> tuple[int, int]:
        """(width, height) as `load()` returns it, from the file's header (no pixel decode):
        EXIF orientations 5-8 (transposed / rotated 90°) swap the two, as transposing does.
        The token budget (cwdpo.run.token_budget) reads it for every image of a dataset."""
        if self.factory is not None or (self.data is None and self.path is None):
            return self.load().size
        import io

        try:
            with Image.open(io.BytesIO(self.data) if self.data is not None else self.path) as f:
                w, h = f.size
                swap = f.getexif().get(0x0112) in (5, 6, 7, 8)
        except Exception as e:  # PIL raises many types for corrupt files
            where = self.name or self.path or "<in-memory image>"
            raise DataError(f"cannot read image {where}: {type(e).__name__}: {e}") from e
        return (h, w) if swap else (w, h)


@dataclass
class CaptionRecord:
    """One image with its reference captions (COCO/Flickr30k/NoCaps/ShapesWorld)."""

    image_id: str
    image: ImageRef
    references: list[str]
    split: str = "train"
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. {"domain": "near-domain"}


@dataclass
class PreferenceRecord:
    """One preference pair for an image: `chosen` preferred over `rejected`.

    `source` records where the negative came from: "dataset", "easy", "hard:<kind>",
    "on_policy", "trl" ... so every negative can be traced.
    """

    image_id: str
    image: ImageRef
    prompt: str
    chosen: str
    rejected: str
    source: str = "dataset"
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class MCQuestion:
    """A multiple-choice question (MMBench / MMMU): options keyed by letter."""

    qid: str
    image: ImageRef | None
    question: str
    options: dict[str, str]
    answer: str
    category: str = ""
    hint: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def record_prompt(record: Any, default: str) -> str:
    """The prompt a record is generated and scored with: its own (`meta["prompt"]`, preference
    data carries one per row), else `default` (the source's). Generation, the teacher-forced
    metrics, the probes and the win-rate judge all read it here, so they agree."""
    meta = getattr(record, "meta", None)
    return (meta.get("prompt") if isinstance(meta, dict) else None) or default


def record_images(record: Any) -> list[ImageRef]:
    """Every image of a record, in order: `meta["images"]` when a row has several (TRL rows,
    MMMU image_1..image_7), else the record's one `image`."""
    refs = record.meta.get("images") if isinstance(getattr(record, "meta", None), dict) else None
    if refs:
        return list(refs)
    return [] if record.image is None else [record.image]


def load_images(record: Any) -> Image.Image | list[Image.Image]:
    """The record's image, or the list of its images when it has several (what
    `VLMBackbone.collate` / `generate` take per row)."""
    refs = record_images(record)
    if not refs:
        raise DataError(
            f"record {getattr(record, 'image_id', getattr(record, 'qid', '?'))}: no image"
        )
    return refs[0].load() if len(refs) == 1 else [r.load() for r in refs]
