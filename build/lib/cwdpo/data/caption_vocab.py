"""The words a caption negative may swap: seed word classes and the vocabulary mined from a corpus.

Why apart from `caption_negatives`: what counts as a colour, number, spatial relation or object
noun (synonyms, plurals, "two"/"2") decides whether a swap makes a caption *wrong*; it is data
about English captions, read by the swapper but independent of how a negative is drawn.
Word classes come from fixed seed lists intersected with the corpus (deterministic, no NLTK).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from cwdpo.data.records import CaptionRecord

KINDS = ("object", "colour", "number", "spatial")

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
class Occurrence:
    """One swappable word or phrase of a caption, by class and character span."""

    kind: str
    key: str  # lower-cased word or phrase
    start: int
    end: int


def occurrences(
    text: str, object_forms: dict[str, tuple[str, bool]] | None = None
) -> list[Occurrence]:
    """Non-overlapping swappable words/phrases of `text`, left to right."""
    objects = OBJECTS if object_forms is None else {**OBJECTS, **object_forms}
    toks = _tokens(text)
    out: list[Occurrence] = []
    i = 0
    while i < len(toks):
        word, start, end = toks[i]
        for phrase in _SPATIAL_PHRASES:
            n = len(phrase)
            if tuple(t[0] for t in toks[i : i + n]) == phrase:
                out.append(Occurrence("spatial", " ".join(phrase), start, toks[i + n - 1][2]))
                i += n
                break
        else:
            if word in COLOURS:
                out.append(Occurrence("colour", word, start, end))
            elif word in NUMBERS:
                out.append(Occurrence("number", word, start, end))
            elif word in objects:
                out.append(Occurrence("object", word, start, end))
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
            for occ in occurrences(text):
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
