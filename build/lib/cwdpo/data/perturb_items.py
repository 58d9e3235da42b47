"""What `cwdpo.perturb` asks a model to perturb, and the preference row it writes back.

Why its own module: the perturbation builder reads every caption or pair source cwdpo reads
(Karpathy COCO/Flickr30k, NoCaps, TRL pairs) through the readers themselves, so a file that
trains also perturbs, with the same row errors. Each positive becomes one `PerturbItem` with a
stable `key` (image id + reference index, or the TRL row): the key is what makes the output
resumable, so it depends on the file's content and order only. The rule-based fallback
(`cwdpo.data.caption_negatives`) is here too, with its word classes mapped onto the paper's
perturbation kinds (object, attribute, count, relation).
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from cwdpo.data.caption_negatives import CaptionVocab, perturb
from cwdpo.data.records import CaptionRecord, DataError, ImageRef, record_images

FORMATS = ("karpathy", "nocaps", "trl")
#: The paper's perturbation kinds (one object, attribute, count or relation changed).
PAPER_KINDS = ("object", "attribute", "count", "relation")
#: The rule-based swapper's word classes as the paper's kinds.
RULE_KINDS = {"object": "object", "colour": "attribute", "number": "count", "spatial": "relation"}


@dataclass
class PerturbItem:
    """One positive to perturb: `chosen` (a reference, or a TRL row's chosen), the texts the
    negative must not equal (`references`, `chosen` among them), its images and prompt."""

    key: str
    image_id: str
    images: list[ImageRef]
    prompt: str
    chosen: str
    references: list[str]
    source: dict[str, Any] = field(default_factory=dict)  # file, row / reference index


def _caption_items(
    records: Sequence[CaptionRecord], fmt: str, path: str, prompt: str, per_image: int
) -> list[PerturbItem]:
    items = []
    for rec in records:
        for j, ref in enumerate(rec.references[:per_image]):
            src = {"format": fmt, "file": path, "image_id": rec.image_id, "reference": j}
            src |= {k: rec.meta[k] for k in ("domain", "karpathy_split") if k in rec.meta}
            items.append(
                PerturbItem(
                    f"{rec.image_id}:{j}",
                    rec.image_id,
                    record_images(rec),
                    prompt,
                    ref,
                    list(rec.references),
                    src,
                )
            )
    return items


def read_items(
    fmt: str,
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    splits: Sequence[str] = ("train",),
    captions_per_image: int = 1,
    prompt: str = "Describe the image in one sentence.",
) -> list[PerturbItem]:
    """The positives of a caption or pair file, in file order.

    - `karpathy`: images of `splits` (restval folded into train), the first
      `captions_per_image` references of each as positives; `image_root` is required.
    - `nocaps`: every domain, as for Karpathy (`image_root`: the images directory).
    - `trl`: each row's `chosen` (its prompt and images kept); `image_root` defaults to the
      file's directory. The row's own `rejected` is not a reference: it is wrong already.
    """
    if fmt not in FORMATS:
        raise DataError(f"input.format must be one of {list(FORMATS)}, got {fmt!r}")
    if captions_per_image < 1:
        raise DataError(f"input.captions_per_image must be >= 1, got {captions_per_image}")
    if fmt == "trl":
        from cwdpo.data.trl_pairs import read_preference_pairs

        pairs = read_preference_pairs(path, image_root)
        return [
            PerturbItem(
                f"row{p.meta['row']}",
                p.image_id,
                list(p.meta.get("images") or [p.image]),
                p.prompt,
                p.chosen,
                [p.chosen],
                {"format": fmt, "file": str(path), "row": p.meta["row"]},
            )
            for p in pairs
        ]
    if image_root is None:
        raise DataError(f"input.image_root is required for {fmt} files ({path})")
    if fmt == "karpathy":
        from cwdpo.data.karpathy import read_karpathy

        records = read_karpathy(path, image_root, splits=tuple(splits))
    else:
        from cwdpo.data.nocaps import read_nocaps

        records = read_nocaps(path, image_root)
    return _caption_items(records, fmt, str(path), prompt, captions_per_image)


def kind_for(key: str, kinds: Sequence[str]) -> str:
    """The kind of perturbation asked for `key`: a hash of the key, so a resumed or re-ordered
    run asks the same and the kinds are spread evenly over the rows."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return kinds[int.from_bytes(digest[:4], "big") % len(kinds)]


def mine_vocab(items: Sequence[PerturbItem]) -> CaptionVocab:
    """The rule-based fallback's vocabulary, mined from every positive and reference."""
    return CaptionVocab.mine([text for it in items for text in it.references])


def rule_perturbation(
    item: PerturbItem, vocab: CaptionVocab, seed: int, kind: str | None = None
) -> tuple[str, str] | None:
    """(text, paper kind) of a one-word rule-based edit of `item.chosen`, preferring the word
    class of `kind`, seeded per key; None when no word of the caption can be swapped."""
    rng = random.Random(f"{seed}:{item.key}")
    wanted = [c for c, k in RULE_KINDS.items() if k == kind]
    for classes in (wanted, list(RULE_KINDS)) if wanted else (list(RULE_KINDS),):
        p = perturb(item.chosen, vocab, rng, item.references, kinds=classes)
        if p is not None:
            return p.text, RULE_KINDS[p.kind]
    return None


def pair_row(
    item: PerturbItem, rejected: str, kind: str, method: str, images: list[str], attempts: int
) -> dict[str, Any]:
    """The TRL-style JSONL row (`data=trl_pairs` reads `images`, `prompt`, `chosen`,
    `rejected`, and `image_id` as the id), plus how the negative was made and where from."""
    return {
        "key": item.key,
        "image_id": item.image_id,
        "images": images,
        "prompt": item.prompt,
        "chosen": item.chosen,
        "rejected": rejected,
        "kind": kind,
        "method": method,
        "attempts": attempts,
        "source": item.source,
    }


def image_paths(item: PerturbItem, image_dir: Path) -> list[str]:
    """Absolute paths of the item's images; images held as bytes (HF datasets) are written
    once under `image_dir`, named by their content hash."""
    out = []
    for ref in item.images:
        if ref.path is not None:
            out.append(str(Path(ref.path).resolve()))
            continue
        if ref.data is not None:
            data = ref.data
            try:
                with Image.open(io.BytesIO(data)) as im:
                    suffix = (im.format or "png").lower()
            except Exception as e:  # PIL raises many types for corrupt bytes
                raise DataError(
                    f"{item.source.get('file')}: {item.key}: cannot read image {ref.name}: {e}"
                ) from e
        else:
            buf = io.BytesIO()
            ref.load().save(buf, format="PNG")
            data, suffix = buf.getvalue(), "png"
        target = image_dir / f"{hashlib.sha256(data).hexdigest()[:32]}.{suffix}"
        if not target.is_file():
            image_dir.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        out.append(str(target.resolve()))
    return out
