"""`negatives.pair_rule=companion_edit`: self-judged pairs that contrast the planted error.

Why: best-vs-worst of K samples at T = 1 differ in many facts, and the F1 judge rewards recall,
so on the co-occurrence testbed the chosen caption names the absent companion more often than
the rejected one (3.6% corrective vs 11.8% anti-corrective pairs, issue 28). Here, on images with
the trigger, the pair is one caption and a one-phrase edit of it that differs only in the
companion's mention, and the truth decides which side is chosen:

| the best candidate | companion absent | companion present |
|---|---|---|
| names it | chosen = it without the companion, rejected = it | chosen = it, rejected = it without |
| does not | chosen = it, rejected = it plus a companion | chosen = it plus the companion, rejected = it |

The inserted companion is small, at a free position drawn the way the noisy annotator draws one
(`cwdpo.data.shapes.world.annotate`); a true companion is inserted as it is in the scene.
"""

from __future__ import annotations

from collections.abc import Sequence

from cwdpo.data.shapes import Obj, Scene
from cwdpo.data.shapes.world import annotator_rng
from cwdpo.data.verifier import add_object, drop_object, mentions_object, parse

Identity = tuple[str, str]


def annotator_position(scene: Scene, taken: set[str], positions: Sequence[str]) -> str | None:
    """A free position (not in the scene, not in `taken`) drawn with the annotator's seeded rng."""
    rng = annotator_rng(scene)
    rng.random()  # the annotator's hallucinate-or-not draw
    free = [p for p in positions if p not in {o.position for o in scene.objects} | taken]
    return rng.choice(free) if free else None


def companion_pair(
    best: str, scene: Scene, trigger: Identity, companion: Identity, positions: Sequence[str]
) -> tuple[str, str, str] | None:
    """(chosen, rejected, kind) for a trigger image, from its best candidate caption `best`;
    kind says which edit (`drop` / `insert`) and whether the companion is `absent` / `present`.
    The sides differ only in the companion's mention — and, under a `there are N shapes :`
    header, in the stated count, which the edit keeps consistent with the mentions.
    None when the scene lacks the trigger or no edit applies (malformed caption, the companion
    its only mention, no free position); the caller falls back to its usual rule."""
    ids = {(o.colour, o.shape) for o in scene.objects}
    if trigger not in ids:
        return None
    best = " ".join(parse(best).tokens)  # both sides in the edit's spelling (lowercase tokens)
    present = companion in ids
    names = mentions_object(best, *companion)
    if names:
        edited = drop_object(best, *companion)
        kind = "drop"
    else:
        if present:
            obj = next(o for o in scene.objects if (o.colour, o.shape) == companion)
        else:
            taken = {m.position for m in parse(best).mentions if m.position}
            pos = annotator_position(scene, taken, positions)
            obj = None if pos is None else Obj(*companion, "small", pos)
        edited = None if obj is None else add_object(best, obj)
        kind = "insert"
    if edited is None:
        return None
    right, wrong = (best, edited) if names == present else (edited, best)
    return right, wrong, f"{kind}:{'present' if present else 'absent'}"
