"""A ShapesWorld verifier that reads the *whole* caption.

Why: the regex fact checker (`shapes.parse_caption`) only finds object phrases, so a gold caption
followed by junk words is judged exact and "a red circle ." on a two-object scene scores facts
precision 1.0. Here every token must be consumed by the caption grammar

    caption  := [header] object ("and" object)* "."
    header   := "there" ("is"|"are") NUMBER ("shape"|"shapes") ":" | "a picture of" | "this image shows"
    object   := ("a"|"an") [SIZE] COLOUR SHAPE ["on" "the" POSITION]

and tokens it cannot place are *unparsed* (the caption is malformed). Against a scene the verdict
gives attribute precision / recall / F1 (optimal one-to-one matching of mentions to objects),
hallucinated and omitted objects (an object's identity is its colour + shape, as CHAIR counts
object categories) and `exact` (everything right, nothing extra, nothing unparsed).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cwdpo.data import shapes as S

if TYPE_CHECKING:
    from cwdpo.data.shapes import Scene

ATTRS = ("size", "colour", "shape", "position")
_TOKEN = re.compile(r"[\w-]+|[^\w\s]")
HEADERS: dict[str, tuple[str, ...]] = {
    "picture": ("a", "picture", "of"),
    "shows": ("this", "image", "shows"),
}


@dataclass(frozen=True)
class Mention:
    """One parsed object phrase; `spans[attr]` is the token index of that attribute's word."""

    colour: str
    shape: str
    size: str | None = None
    position: str | None = None
    spans: tuple[tuple[str, int], ...] = ()

    def identity(self) -> tuple[str, str]:
        return self.colour, self.shape

    def stated(self) -> int:
        return 2 + (self.size is not None) + (self.position is not None)


@dataclass
class Parse:
    tokens: list[str]
    mentions: list[Mention] = field(default_factory=list)
    ranges: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each mention
    count: str | None = None
    count_index: int | None = None
    header: str | None = None  # "count" | "picture" | "shows" | None
    unparsed: list[int] = field(default_factory=list)  # token indices the grammar could not place
    terminated: bool = False  # the object list ended with "."

    @property
    def malformed(self) -> bool:
        return bool(self.unparsed) or not self.terminated or not self.mentions


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _object_at(tok: list[str], i: int) -> tuple[Mention, int] | None:
    """Parse `object` at token i; returns (mention, next index) or None."""
    if i >= len(tok) or tok[i] not in ("a", "an"):
        return None
    j, spans = i + 1, []
    size = None
    if j < len(tok) and tok[j] in S.SIZES:
        size, spans = tok[j], [("size", j)]
        j += 1
    if j + 1 >= len(tok) or tok[j] not in S.COLOURS or tok[j + 1] not in S.SHAPES:
        return None
    colour, shape = tok[j], tok[j + 1]
    spans += [("colour", j), ("shape", j + 1)]
    j += 2
    position = None
    if j + 2 < len(tok) and tok[j] == "on" and tok[j + 1] == "the" and tok[j + 2] in S.POSITIONS:
        position = tok[j + 2]
        spans.append(("position", j + 2))
        j += 3
    return Mention(colour, shape, size, position, tuple(spans)), j


def parse(text: str) -> Parse:
    """Full-grammar parse; never raises. Tokens outside the grammar go to `unparsed`."""
    tok = tokenize(text)
    p = Parse(tokens=tok)
    i = 0
    if (
        tok[:1] == ["there"]
        and len(tok) >= 5
        and tok[1] in ("is", "are")
        and tok[2] in S.NUMBERS
        and tok[3] in ("shape", "shapes")
        and tok[4] == ":"
    ):
        p.header, p.count, p.count_index, i = "count", tok[2], 2, 5
    else:
        for name, words in HEADERS.items():
            if tuple(tok[: len(words)]) == words and _object_at(tok, len(words)) is not None:
                p.header, i = name, len(words)
                break
    expect_object = True
    while i < len(tok):
        if p.terminated:  # anything after the final "." is junk
            p.unparsed.append(i)
            i += 1
            continue
        if expect_object:
            m = _object_at(tok, i)
            if m is not None:
                p.mentions.append(m[0])
                p.ranges.append((i, m[1]))
                i, expect_object = m[1], False
                continue
        elif tok[i] == "and":
            i, expect_object = i + 1, True
            continue
        elif tok[i] == ".":
            p.terminated, i = True, i + 1
            continue
        p.unparsed.append(i)
        i += 1
    if expect_object and p.mentions:  # a dangling "and" before the end
        p.terminated = False
    return p


@dataclass
class Verdict:
    """Caption vs scene. Facts are (mention, attribute) pairs plus a stated count."""

    n_tokens: int
    n_unparsed: int
    malformed: bool
    n_mentions: int
    n_objects: int
    stated: int  # stated facts (attributes of mentions + count)
    correct: int  # correct stated facts under the optimal matching
    correct_attrs: int  # correct object attributes (count excluded) — recall's numerator
    exact_objects: int  # scene objects described with all four attributes right
    hallucinated: int  # mentions whose colour+shape is not in the scene (multiset)
    omitted: int  # scene objects whose colour+shape is never mentioned (multiset)
    count_correct: bool | None  # None when no count was stated

    @property
    def precision(self) -> float:
        return self.correct / self.stated if self.stated else 0.0

    @property
    def recall(self) -> float:
        return self.correct_attrs / (len(ATTRS) * self.n_objects) if self.n_objects else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def object_recall(self) -> float:
        return 1.0 - self.omitted / self.n_objects if self.n_objects else 1.0

    @property
    def exact(self) -> bool:
        return (
            not self.malformed
            and self.exact_objects == self.n_objects == self.n_mentions
            and self.count_correct is not False
        )

    @property
    def score(self) -> float:
        """Judge score in [0, 1]: fact F1 (a wrong count lowers precision) times the share of
        tokens the grammar parsed, so junk costs in proportion to its length."""
        if self.n_tokens == 0:
            return 0.0
        return self.f1 * (1.0 - self.n_unparsed / self.n_tokens)


def _match(mentions: list[Mention], scene: Scene) -> tuple[int, int]:
    """Optimal one-to-one matching (DP over used-object bitmasks; ≤ 4 objects): maximises
    (correct stated attributes, exactly described objects) and returns both. Any mention may stay
    unmatched (a hallucination), not only once every object is taken: else a hallucinated
    mention before the true one would take its object."""
    objs = scene.objects
    best: dict[int, tuple[int, int]] = {0: (0, 0)}
    for m in mentions:
        row = [
            sum(getattr(m, a) is not None and getattr(m, a) == getattr(o, a) for a in ATTRS)
            for o in objs
        ]
        nxt: dict[int, tuple[int, int]] = {}
        for used, (c, e) in best.items():
            for i in [k for k in range(len(objs)) if not used >> k & 1] + [None]:
                key = used if i is None else used | 1 << i
                val = (c, e) if i is None else (c + row[i], e + (row[i] == len(ATTRS)))
                if val > nxt.get(key, (-1, -1)):
                    nxt[key] = val
        best = nxt
    return max(best.values())


def verify(text: str | Parse, scene: Scene) -> Verdict:
    p = parse(text) if isinstance(text, str) else text
    correct, exact_objs = _match(p.mentions, scene)
    attrs = correct  # unstated attributes are never correct: recall's numerator
    stated = sum(m.stated() for m in p.mentions)
    count_correct = None
    if p.count is not None:
        stated += 1
        count_correct = p.count == S.NUMBERS[len(scene.objects)]
        correct += count_correct
    said, there = (
        Counter(m.identity() for m in p.mentions),
        Counter((o.colour, o.shape) for o in scene.objects),
    )
    return Verdict(
        n_tokens=len(p.tokens),
        n_unparsed=len(p.unparsed),
        malformed=p.malformed,
        n_mentions=len(p.mentions),
        n_objects=len(scene.objects),
        stated=stated,
        correct=correct,
        correct_attrs=attrs,
        exact_objects=exact_objs,
        hallucinated=sum((said - there).values()),
        omitted=sum((there - said).values()),
        count_correct=count_correct,
    )


def mentions_object(text: str | Parse, colour: str, shape: str) -> bool:
    """Does the caption (as parsed) mention an object of this colour and shape?"""
    p = parse(text) if isinstance(text, str) else text
    return any(m.identity() == (colour, shape) for m in p.mentions)


def _rebuild(p: Parse, mentions: list[list[str]]) -> str:
    """A well-formed caption's header, then `mentions` joined by "and", then its "."; a stated
    count (`there are N shapes :`) restated for the new number of objects."""
    head, tail = p.tokens[: p.ranges[0][0]], p.tokens[p.ranges[-1][1] :]
    n = len(mentions)
    if p.header == "count":
        head = [
            "there",
            "is" if n == 1 else "are",
            S.NUMBERS[n],
            "shape" if n == 1 else "shapes",
            ":",
        ]
    body = [t for i, m in enumerate(mentions) for t in (["and"] if i else []) + m]
    return " ".join(head + body + tail)


def drop_object(text: str, colour: str, shape: str) -> str | None:
    """`text` with every mention of a (colour, shape) object deleted (and its "and"), a stated
    count lowered to match, every other token kept. None when the caption is malformed, never
    names the object, or names nothing else.

    Why: a pair that differs only in one object's mention contrasts exactly that fact (the
    testbed's companion), where best-vs-worst samples differ in many."""
    p = parse(text)
    if p.malformed:
        return None
    keep = [
        p.tokens[s:e] for m, (s, e) in zip(p.mentions, p.ranges) if m.identity() != (colour, shape)
    ]
    if len(keep) in (0, len(p.mentions)):
        return None
    return _rebuild(p, keep)


def add_object(text: str, obj: S.Obj) -> str | None:
    """`text` with "a <size> <colour> <shape> on the <position>" inserted as a new mention —
    before the first mention whose position comes later in the world's canonical order (left,
    right, top, bottom), else last — a stated count raised to match, every other token kept.
    None when the caption is malformed or already states five objects."""
    p = parse(text)
    if p.malformed or len(p.mentions) + 1 >= len(S.NUMBERS):
        return None
    order = {pos: i for i, pos in enumerate(S.POSITIONS)}
    spans = [p.tokens[s:e] for s, e in p.ranges]
    at = next(
        (
            i
            for i, m in enumerate(p.mentions)
            if m.position is not None and order[m.position] > order[obj.position]
        ),
        len(spans),
    )
    return _rebuild(p, [*spans[:at], ["a", *obj.phrase().split()], *spans[at:]])


def minimal_negative(
    text: str,
    scene: Scene,
    rng: random.Random,
    pools: dict[str, tuple[str, ...]] | None = None,
) -> tuple[str, str] | None:
    """A one-fact edit of `text` itself: one attribute word of one mention (or the stated count)
    replaced, same template, same object order, every other token kept; the edit must lower the
    verifier's score (so it is wrong, not a paraphrase). None when no such edit exists.

    Why: the paper's stage-2 negatives are minimal perturbations of the *winning* caption; an
    independently drawn template makes the pair differ in many tokens, not one fact.
    """
    p = parse(text)
    pools = pools or {
        "colour": tuple(S.COLOURS),
        "shape": S.SHAPES,
        "size": S.SIZES,
        "position": S.POSITIONS,
    }
    base = verify(p, scene).score
    taken = {o.position for o in scene.objects} | {m.position for m in p.mentions if m.position}
    sites: dict[str, list[tuple[int, tuple[str, ...]]]] = {}
    for m in p.mentions:
        for attr, idx in m.spans:
            pool = tuple(
                v
                for v in pools[attr]
                if v != p.tokens[idx] and (attr != "position" or v not in taken)
            )
            if pool:
                sites.setdefault(attr, []).append((idx, pool))
    if p.count_index is not None:
        sites["count"] = [(p.count_index, tuple(n for n in S.NUMBERS[1:] if n != p.count))]
    kinds = sorted(sites)
    rng.shuffle(kinds)
    for kind in kinds:  # kind first (uniform over kinds), then a site, then a value
        options = [(i, v) for i, pool in sites[kind] for v in pool]
        rng.shuffle(options)
        for idx, value in options:
            tok = list(p.tokens)
            tok[idx] = value
            out = " ".join(tok)
            if verify(out, scene).score < base:
                return out, f"hard:{kind}"
    return None


def word_edit_distance(a: str, b: str) -> int:
    """Levenshtein distance over tokens: 1 = a one-word substitution/insertion/deletion."""
    x, y = tokenize(a), tokenize(b)
    prev = list(range(len(y) + 1))
    for i, u in enumerate(x, 1):
        cur = [i]
        for j, v in enumerate(y, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (u != v)))
        prev = cur
    return prev[-1]
