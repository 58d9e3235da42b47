"""Dataset negatives for captioning: captions of other images (easy) and minimally perturbed
positives (hard).

CW-DPO is about *how hard* a negative is: an easy negative (a caption of another image) is
far below the policy's confidence floor and gets a small cooling weight, while a hard one (the
positive with one object / colour / number / spatial relation swapped) sits close to the
positive. Both are built from the dataset's own captions, so no external model is needed and
swaps only use words the corpus actually contains.

Word classes come from fixed seed lists intersected with the corpus (deterministic, no NLTK).
Swaps keep the sentence well-formed and actually wrong: synonyms (grey/gray, bike/bicycle,
"two"/"2") are never swapped for each other, plurality is preserved, and "a"/"an" follows
the new word. A hard negative never equals (case- and punctuation-insensitively) any
reference of its image.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cwdpo.data.karpathy import Stats, bump, report_skipped
from cwdpo.data.records import CaptionRecord, DataError, PreferenceRecord, normalize

log = logging.getLogger(__name__)

KINDS = ("object", "colour", "number", "spatial")
EASY_SOURCE = "easy:other_image"

# word -> canonical colour (synonyms share a canonical form and are never swapped for each other)
_COLOUR_WORDS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black"]
_COLOUR_WORDS += ["white", "silver", "gold", "beige", "tan"]
COLOURS: dict[str, str] = {w: w for w in _COLOUR_WORDS}
COLOURS.update({"grey": "gray", "gray": "gray"})

_NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
# word or digit -> (value, style); swaps keep the style and the singular/plural boundary
NUMBERS: dict[str, tuple[int, str]] = {w: (k + 1, "word") for k, w in enumerate(_NUMBER_WORDS)}
NUMBERS.update({str(k): (k, "digit") for k in range(1, 11)})

# phrase -> group; relations are swapped only within a group so the sentence stays grammatical
SPATIAL: dict[str, str] = {"left": "side", "right": "side"}
SPATIAL.update(
    {
        p: "preposition"
        for p in (
            "on top of",
            "in front of",
            "next to",
            "above",
            "below",
            "under",
            "underneath",
            "beneath",
            "behind",
            "beside",
            "near",
            "inside",
        )
    }
)
_SPATIAL_PHRASES = sorted(
    (tuple(p.split()) for p in SPATIAL), key=lambda t: -len(t)
)  # longest first

# Countable COCO-ish object nouns. Synonyms are written "a/b" and share a concept (never swapped
# for each other); hypernyms (person, people, child, animal, vehicle) and mass nouns are left
# out because swapping them does not make a caption wrong.
_OBJECT_SEED = """
man/guy woman/lady boy girl baby dog/puppy cat/kitten horse cow elephant bear zebra giraffe bird
bicycle/bike car motorcycle/motorbike airplane/plane/jet bus train truck boat bench umbrella
backpack handbag/purse suitcase frisbee snowboard ball kite skateboard surfboard bottle cup fork
knife spoon bowl banana apple sandwich carrot pizza donut/doughnut cake chair couch/sofa bed table
toilet tv/television laptop computer keyboard phone/cellphone microwave oven toaster sink
refrigerator/fridge book clock vase toothbrush hat shirt tree building street road beach field
room kitchen bathroom window door wall plate sign fence flower boy bat glove tower bridge desk
"""
_IRREGULAR = {"man": "men", "woman": "women", "knife": "knives", "mouse": "mice"}


def _plural(word: str) -> str:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _object_table() -> dict[str, tuple[str, bool]]:
    table: dict[str, tuple[str, bool]] = {}
    for entry in _OBJECT_SEED.split():
        forms = entry.split("/")
        concept = forms[0]
        for w in forms:
            table.setdefault(w, (concept, False))
            table.setdefault(_plural(w), (concept, True))
    return table


OBJECTS: dict[str, tuple[str, bool]] = _object_table()  # word -> (concept, is_plural)

_TOKEN = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?|\d+")
# words after "a"/"an" that are not object nouns (for the optional determiner heuristic)
_NOT_NOUNS = {"a", "an", "the", "of", "in", "on", "at", "to", "and", "with", "for", "is", "are"}
_NOT_NOUNS |= {"very", "small", "large", "big", "little", "young", "old", "few", "couple", "lot"}
_NOT_NOUNS |= {"bunch", "group", "pair", "close", "view", "picture", "photo", "image"}


def _tokens(text: str) -> list[tuple[str, int, int]]:
    return [(m.group().lower(), m.start(), m.end()) for m in _TOKEN.finditer(text)]


@dataclass(frozen=True)
class _Occurrence:
    kind: str
    key: str  # lower-cased word or phrase
    start: int
    end: int


def _occurrences(
    text: str, object_forms: dict[str, tuple[str, bool]] | None = None
) -> list[_Occurrence]:
    """Non-overlapping swappable words/phrases of `text`, left to right."""
    objects = OBJECTS if object_forms is None else {**OBJECTS, **object_forms}
    toks = _tokens(text)
    out: list[_Occurrence] = []
    i = 0
    while i < len(toks):
        word, start, end = toks[i]
        for phrase in _SPATIAL_PHRASES:
            n = len(phrase)
            if tuple(t[0] for t in toks[i : i + n]) == phrase:
                out.append(_Occurrence("spatial", " ".join(phrase), start, toks[i + n - 1][2]))
                i += n
                break
        else:
            if word in COLOURS:
                out.append(_Occurrence("colour", word, start, end))
            elif word in NUMBERS:
                out.append(_Occurrence("number", word, start, end))
            elif word in objects:
                out.append(_Occurrence("object", word, start, end))
            i += 1
    return out


def _captions(records: Iterable[CaptionRecord | str]) -> Iterable[str]:
    for r in records:
        if isinstance(r, str):
            yield r
        else:
            yield from r.references


@dataclass
class CaptionVocab:
    """Word classes mined from a caption corpus: word -> count for each class.

    Only words in here are used as *replacements*, so negatives stay in the corpus' language.
    `object_forms` maps every mined object word to (concept, is_plural).
    """

    colours: dict[str, int] = field(default_factory=dict)
    numbers: dict[str, int] = field(default_factory=dict)
    spatial: dict[str, int] = field(default_factory=dict)
    objects: dict[str, int] = field(default_factory=dict)
    object_forms: dict[str, tuple[str, bool]] = field(default_factory=dict)

    @classmethod
    def mine(
        cls,
        records: Iterable[CaptionRecord | str],
        min_count: int = 1,
        determiner_min_count: int | None = None,
    ) -> CaptionVocab:
        """Count seed-list words in the captions; keep those seen at least `min_count` times.

        With `determiner_min_count`, words that follow "a"/"an" at least that often (and are not
        in any other class or a small stop list) are added as singular object nouns too.
        """
        counts: dict[str, Counter[str]] = {k: Counter() for k in KINDS}
        after_article: Counter[str] = Counter()
        for text in _captions(records):
            for occ in _occurrences(text):
                counts[occ.kind][occ.key] += 1
            if determiner_min_count is not None:
                toks = [t[0] for t in _tokens(text)]
                for prev, word in zip(toks, toks[1:]):
                    if prev in ("a", "an"):
                        after_article[word] += 1

        def keep(c: Counter[str]) -> dict[str, int]:
            return {w: n for w, n in sorted(c.items()) if n >= min_count}

        objects = keep(counts["object"])
        forms = {w: OBJECTS[w] for w in objects}
        if determiner_min_count is not None:
            for w, n in sorted(after_article.items()):
                known = w in COLOURS or w in NUMBERS or w in SPATIAL or w in OBJECTS
                adjective_like = w.endswith(("ing", "ly", "ed")) or w in _NOT_NOUNS
                if n >= determiner_min_count and not known and not adjective_like and w.isalpha():
                    objects[w] = n
                    forms[w] = (w, False)
        return cls(
            colours=keep(counts["colour"]),
            numbers=keep(counts["number"]),
            spatial=keep(counts["spatial"]),
            objects=objects,
            object_forms=forms,
        )

    def candidates(self, kind: str, key: str) -> list[str]:
        """Replacement words of the same class that make `key` wrong, sorted (deterministic)."""
        if kind == "colour":
            return [w for w in self.colours if COLOURS[w] != COLOURS[key]]
        if kind == "number":
            value, style = NUMBERS[key]
            return [
                w
                for w in self.numbers
                if NUMBERS[w][1] == style
                and NUMBERS[w][0] != value
                and (NUMBERS[w][0] == 1) == (value == 1)
            ]
        if kind == "spatial":
            return [w for w in self.spatial if w != key and SPATIAL[w] == SPATIAL[key]]
        if kind == "object":
            forms = {**OBJECTS, **self.object_forms}
            concept, plural = forms[key]
            return [
                w
                for w in self.objects
                if self.object_forms[w][1] == plural and self.object_forms[w][0] != concept
            ]
        raise ValueError(f"unknown word class {kind!r}; expected one of {KINDS}")


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


def _substitute(text: str, occ: _Occurrence, word: str) -> tuple[str, str]:
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
    occurrences = _occurrences(caption, vocab.object_forms)
    present = {(o.kind, _meaning(o.kind, o.key, forms)) for o in occurrences}
    by_kind: dict[str, list[tuple[_Occurrence, list[str]]]] = {}
    for occ in occurrences:
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


def _easy(
    record: CaptionRecord, pool: Sequence[CaptionRecord], rng: random.Random
) -> tuple[str, str]:
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
    text, _ = _easy(record, pool, rng)
    return text, EASY_SOURCE


def make_dataset_pairs(
    records: Sequence[CaptionRecord],
    prompt: str,
    vocab: CaptionVocab | None = None,
    hard_fraction: float = 0.5,
    rng_seed: int = 0,
    *,
    per: str = "reference",
    stats: Stats | None = None,
) -> list[PreferenceRecord]:
    """Preference pairs (reference, dataset negative) for caption records.

    `per="reference"`: one pair per (record, reference); `per="record"`: one pair per record
    with a reference drawn at random. Each pair is hard with probability `hard_fraction`
    (falling back to easy when no swap is possible, `meta["fallback"]`), else easy. `source`
    says which; hard pairs record the swap in `meta["perturbed"]` = {kind, from, to}, easy ones
    `meta["negative_image_id"]`. Deterministic for a given `rng_seed`. `vocab` defaults to one
    mined from `records`. Records without references are skipped (logged, counted).
    """
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
    if per not in ("reference", "record"):
        raise ValueError(f"per must be 'reference' or 'record', got {per!r}")
    records = list(records)
    if vocab is None:
        vocab = CaptionVocab.mine(records)
    rng = random.Random(rng_seed)
    pool = [r for r in records if r.references]
    counts: Counter[str] = Counter()
    pairs: list[PreferenceRecord] = []
    for rec in records:
        if not rec.references:
            counts["no_references"] += 1
            continue
        if per == "reference":
            chosen = list(enumerate(rec.references))
        else:
            j = rng.randrange(len(rec.references))
            chosen = [(j, rec.references[j])]
        for j, ref in chosen:
            meta: dict[str, Any] = {**rec.meta, "split": rec.split, "reference_index": j}
            want_hard = rng.random() < hard_fraction
            p = perturb(ref, vocab, rng, rec.references) if want_hard else None
            if p is not None:
                text, source = p.text, p.source
                meta["perturbed"] = {"kind": p.kind, "from": p.original, "to": p.replacement}
            else:
                text, meta["negative_image_id"] = _easy(rec, pool, rng)
                source = EASY_SOURCE
                if want_hard:
                    meta["fallback"] = "no_hard_negative"
                    counts["hard_fallback_to_easy"] += 1
            counts[source] += 1
            pairs.append(
                PreferenceRecord(
                    image_id=rec.image_id,
                    image=rec.image,
                    prompt=prompt,
                    chosen=ref,
                    rejected=text,
                    source=source,
                    meta=meta,
                )
            )
    report_skipped(
        stats,
        "skipped_no_references",
        counts.pop("no_references", 0),
        "caption records",
        "records without references",
    )
    for k, n in counts.items():
        bump(stats, k, n)
    log.info("dataset negatives: %s", dict(sorted(counts.items())))
    return pairs
