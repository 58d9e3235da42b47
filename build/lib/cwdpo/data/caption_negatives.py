"""Dataset negatives for captioning: captions of other images (easy) and minimally perturbed
positives (hard).

CW-DPO is about *how hard* a negative is: an easy negative (a caption of another image) is
far below the policy's confidence floor and gets a small cooling weight, while a hard one (the
positive with one object / colour / number / spatial relation swapped) sits close to the
positive. Both are built from the dataset's own captions, so no external model is needed and
swaps only use words the corpus actually contains.

Word classes (`cwdpo.data.caption_vocab`) come from fixed seed lists intersected with the
corpus (deterministic, no NLTK). Swaps keep the sentence well-formed and actually wrong:
synonyms (grey/gray, bike/bicycle, "two"/"2") are never swapped for each other, plurality is
preserved, and "a"/"an" follows the new word. A hard negative never equals (case- and
punctuation-insensitively) any reference of its image.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cwdpo.data.caption_vocab import (
    COLOURS,
    KINDS,
    NUMBERS,
    OBJECTS,
    CaptionVocab,
    Occurrence,
    occurrences,
)
from cwdpo.data.records import CaptionRecord, DataError, normalize

__all__ = [
    "EASY_SOURCE",
    "KINDS",
    "CaptionVocab",
    "Perturbation",
    "easy_negative",
    "hard_negative",
    "normalize",
    "other_image_caption",
    "perturb",
]

EASY_SOURCE = "easy:other_image"


@dataclass(frozen=True)
class Perturbation:
    """A hard negative: `text` is the caption with `original` (at `start`) replaced."""

    text: str
    kind: str
    original: str
    replacement: str
    start: int

    @property
    def source(self) -> str:
        return f"hard:{self.kind}"


def _match_case(src: str, word: str) -> str:
    if len(src) > 1 and src.isupper():
        return word.upper()
    return word[:1].upper() + word[1:] if src[:1].isupper() else word


def _substitute(text: str, occ: Occurrence, word: str) -> tuple[str, str]:
    """`text` with `occ` replaced by `word` (case matched, "a"/"an" fixed) and the inserted word."""
    original = text[occ.start : occ.end]
    new = _match_case(original, word)
    head = text[: occ.start]
    article = re.search(r"\b(an?)(\s+)$", head, flags=re.IGNORECASE)
    if article:  # keep "a"/"an" agreeing with the new word
        art = "an" if new[:1].lower() in "aeiou" else "a"
        art = _match_case(article.group(1), art)
        head = head[: article.start(1)] + art + article.group(2)
    return head + new + text[occ.end :], new


def _meaning(kind: str, word: str, forms: dict[str, tuple[str, bool]]) -> str:
    """What a word denotes, so synonyms compare equal (bike/bicycle, grey/gray)."""
    if kind == "object":
        return forms[word][0]
    if kind == "colour":
        return COLOURS[word]
    if kind == "number":
        return str(NUMBERS[word][0])
    return word


def perturb(
    caption: str,
    vocab: CaptionVocab,
    rng: random.Random,
    references: Sequence[str] = (),
    kinds: Sequence[str] = KINDS,
) -> Perturbation | None:
    """Swap one word of one class (class, then occurrence, then replacement chosen by `rng`).

    Classes are drawn uniformly among those that can be swapped, so frequent object nouns do not
    crowd out colours or relations. Returns None when nothing can be swapped into a caption that
    differs from `caption` and from every one of `references`.
    """
    forbidden = {normalize(caption), *(normalize(r) for r in references)}
    forms = {**OBJECTS, **vocab.object_forms}
    found = occurrences(caption, vocab.object_forms)
    present = {(o.kind, _meaning(o.kind, o.key, forms)) for o in found}
    by_kind: dict[str, list[tuple[Occurrence, list[str]]]] = {}
    for occ in found:
        if occ.kind in kinds:
            cands = vocab.candidates(occ.kind, occ.key)
            if cands:
                by_kind.setdefault(occ.kind, []).append((occ, cands))
    order = sorted(by_kind)
    rng.shuffle(order)
    for kind in order:
        occs = list(by_kind[kind])
        rng.shuffle(occs)
        for occ, cands in occs:
            cands = list(cands)
            rng.shuffle(cands)
            # prefer words not already in the caption ("a man on a bike" -> not "a bike on a bike")
            cands.sort(key=lambda w, k=kind: (k, _meaning(k, w, forms)) in present)
            for word in cands:
                text, new = _substitute(caption, occ, word)
                if normalize(text) not in forbidden:
                    return Perturbation(text, kind, caption[occ.start : occ.end], new, occ.start)
    return None


def hard_negative(
    caption: str,
    vocab: CaptionVocab,
    rng: random.Random,
    references: Sequence[str] = (),
) -> tuple[str, str] | None:
    """`(text, "hard:<kind>")` for a one-word perturbation of `caption`, or None (caller falls
    back, e.g. to `easy_negative`). See `perturb` for the details."""
    p = perturb(caption, vocab, rng, references)
    return None if p is None else (p.text, p.source)


def other_image_caption(
    record: CaptionRecord, pool: Sequence[CaptionRecord], rng: random.Random
) -> tuple[str, str]:
    """(a caption of another image in `pool`, that image's id), never equal (normalised) to one
    of `record`'s references; `DataError` when the pool has none."""
    own = {normalize(r) for r in record.references}

    def usable(other: CaptionRecord) -> list[str]:
        if other.image_id == record.image_id:
            return []
        return [r for r in other.references if normalize(r) not in own]

    for _ in range(20):  # rejection sampling: cheap for real pools
        other = pool[rng.randrange(len(pool))] if pool else None
        if other is not None and (refs := usable(other)):
            return rng.choice(refs), other.image_id
    offset = rng.randrange(len(pool)) if pool else 0
    for k in range(len(pool)):  # tiny or degenerate pools: scan once
        other = pool[(offset + k) % len(pool)]
        if refs := usable(other):
            return rng.choice(refs), other.image_id
    raise DataError(
        f"no caption of another image (different from the references of {record.image_id!r}) "
        f"in a pool of {len(pool)} records"
    )


def easy_negative(
    record: CaptionRecord, pool: Sequence[CaptionRecord], rng: random.Random
) -> tuple[str, str]:
    """`(caption of another image, "easy:other_image")`; never one of `record`'s references."""
    text, _ = other_image_caption(record, pool, rng)
    return text, EASY_SOURCE
