"""Reading a caption back into facts and scoring them against the scene that was drawn.

Kept apart from the world so the checker's matching rule (one mention per object, chosen to
maximise agreement) is one small module that the verifier and the metrics can be read against.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cwdpo.data.shapes.world import NUMBERS, Scene

_OBJ_RE = re.compile(
    r"\b(?:a|an)\s+(?:(small|large)\s+)?(\w+)\s+(circle|square|triangle)(?:\s+on\s+the\s+(\w+))?"
)
_COUNT_RE = re.compile(r"\bthere\s+(?:is|are)\s+(\w+)\s+shapes?\b")


@dataclass
class Facts:
    objects: list[tuple[str | None, str, str, str | None]] = field(default_factory=list)
    count: str | None = None


def parse_caption(text: str) -> Facts:
    """Extract stated facts: per object (size?, colour, shape, position?) and the count."""
    t = text.lower()
    facts = Facts()
    for m in _OBJ_RE.finditer(t):
        facts.objects.append((m.group(1), m.group(2), m.group(3), m.group(4)))
    c = _COUNT_RE.search(t)
    facts.count = c.group(1) if c else None
    return facts


def _best_matching(agree: list[list[int]], n_objects: int) -> tuple[int, int]:
    """(correct facts, exactly described objects) of the best one-to-one matching of mentions
    (rows of per-object agreement counts) to scene objects. Optimal, not greedy, so mention
    order can never steal the object another mention describes exactly; ≤ 4 objects keep the
    used-object bitmask at ≤ 16 states."""
    best = {0: (0, 0)}  # used-object bitmask -> (correct facts, exact objects)
    for row in agree:
        nxt: dict[int, tuple[int, int]] = {}
        for used, (c, e) in best.items():
            free = [i for i in range(n_objects) if not used >> i & 1]
            for i in free or [None]:
                key = used if i is None else used | 1 << i
                val = (c, e) if i is None else (c + row[i], e + (row[i] == 4))
                if val > nxt.get(key, (-1, -1)):
                    nxt[key] = val
        best = nxt
    return max(best.values())


def fact_scores(text: str, scene: Scene) -> dict[str, float]:
    """Precision of the caption's stated facts and recall of the scene's objects.

    A fact is one attribute of one mentioned object (colour, shape, size, position) or the
    stated count. Mentions are matched one-to-one to scene objects to maximise agreement.
    `accuracy` = correct facts / stated facts (0 when nothing parseable is stated);
    `exact` = every object described exactly, nothing extra, and the whole caption parses
    (`cwdpo.data.verifier`: no junk tokens, terminated). `verifier.verify` adds recall of
    attributes, hallucinated / omitted objects and a junk-aware score.
    """
    facts = parse_caption(text)
    objs = scene.objects
    agree, stated = [], 0
    for size, colour, shape, pos in facts.objects:
        stated += 2 + (size is not None) + (pos is not None)
        agree.append(
            [
                (colour == o.colour)
                + (shape == o.shape)
                + (size is not None and size == o.size)
                + (pos is not None and pos == o.position)
                for o in objs
            ]
        )
    correct, exact_objs = _best_matching(agree, len(objs))
    if facts.count is not None:
        stated += 1
        correct += facts.count == NUMBERS[len(scene.objects)]
    n_mentioned = len(facts.objects)
    from cwdpo.data.verifier import parse  # the full grammar: gold + junk is not exact

    return {
        "accuracy": correct / stated if stated else 0.0,
        "recall": min(n_mentioned, len(objs)) / len(objs),
        "exact": float(
            exact_objs == len(scene.objects) == n_mentioned and not parse(text).malformed
        ),
        "stated": float(stated),
    }


def fact_accuracy(text: str, scene: Scene) -> float:
    return fact_scores(text, scene)["accuracy"]
