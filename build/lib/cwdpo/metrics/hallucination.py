"""Object-hallucination metrics a VLM-alignment study reports, on ShapesWorld ground truth.

CHAIR (Rohrbach et al. 2018) counts mentioned object categories absent from the image: CHAIR_i =
hallucinated mentions / all mentions, CHAIR_s = captions with at least one. POPE (Li et al. 2023)
asks balanced yes/no questions "is there a <object>?" — here the answer is read off the
generated caption (yes ⇔ the caption mentions that colour + shape), because a captioning policy
has never been taught to answer questions; the *adversarial* split asks about the co-occurrence
companion where the trigger is present and the companion is not, which is exactly the planted
error. An object's identity is its colour + shape (the verifier's convention).

Everything is reported in percent except `length` (tokens).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from itertools import product
from typing import TYPE_CHECKING

from cwdpo.data import shapes as S
from cwdpo.data.verifier import mentions_object, parse, verify

if TYPE_CHECKING:
    from cwdpo.data.shapes import Scene

Ident = tuple[str, str]


def _ids(scene: Scene) -> set[Ident]:
    return {(o.colour, o.shape) for o in scene.objects}


def caption_metrics(
    outputs: Sequence[str], scenes: Sequence[Scene], cooc: tuple[Ident, Ident] | None = None
) -> dict[str, float]:
    """CHAIR_i/s, object recall, attribute precision/recall/F1, exact, malformed, length and (with a
    co-occurrence rule) how often the companion is said where absent / present."""
    if len(outputs) != len(scenes) or not outputs:
        raise ValueError(
            f"caption_metrics needs one output per scene, got {len(outputs)} and {len(scenes)}"
        )
    vs = [verify(o, s) for o, s in zip(outputs, scenes)]
    mentions = sum(v.n_mentions for v in vs)
    stated = sum(v.stated for v in vs)
    out = {
        "chair_i": 100.0 * sum(v.hallucinated for v in vs) / mentions if mentions else 0.0,
        "chair_s": 100.0 * sum(v.hallucinated > 0 for v in vs) / len(vs),
        "object_recall": 100.0 * (1 - sum(v.omitted for v in vs) / sum(v.n_objects for v in vs)),
        "attr_precision": 100.0 * sum(v.correct for v in vs) / stated if stated else 0.0,
        "attr_recall": 100.0 * sum(v.correct_attrs for v in vs) / sum(4 * v.n_objects for v in vs),
        "f1": 100.0 * sum(v.f1 for v in vs) / len(vs),
        "verified_exact": 100.0 * sum(v.exact for v in vs) / len(vs),
        "malformed": 100.0 * sum(v.malformed for v in vs) / len(vs),
        "length": sum(v.n_tokens for v in vs) / len(vs),
    }
    if cooc is not None:
        trigger, comp = cooc
        absent = [o for o, s in zip(outputs, scenes) if trigger in _ids(s) and comp not in _ids(s)]
        present = [o for o, s in zip(outputs, scenes) if comp in _ids(s)]
        out["companion_halluc"] = (
            100.0 * sum(mentions_object(o, *comp) for o in absent) / len(absent)
            if absent
            else float("nan")
        )
        out["companion_recall"] = (
            100.0 * sum(mentions_object(o, *comp) for o in present) / len(present)
            if present
            else float("nan")
        )
    return out


def pope_queries(
    scenes: Sequence[Scene],
    seed: int = 0,
    cooc: tuple[Ident, Ident] | None = None,
    colours: Sequence[str] = tuple(S.COLOURS),
    shapes: Sequence[str] = S.SHAPES,
) -> dict[str, list[tuple[int, Ident, bool]]]:
    """Balanced (scene index, object, truly present) queries. random: every present object plus
    as many absent ones drawn uniformly; adversarial (with a rule): for each trigger scene without
    the companion, the companion (absent) and one present object."""
    rng = random.Random(seed)
    universe = list(product(colours, shapes))
    rand: list[tuple[int, Ident, bool]] = []
    adv: list[tuple[int, Ident, bool]] = []
    for i, sc in enumerate(scenes):
        here = sorted(_ids(sc))
        absent = [u for u in universe if u not in here]
        rand += [(i, u, True) for u in here]
        rand += [(i, u, False) for u in rng.sample(absent, min(len(here), len(absent)))]
        if cooc is not None and cooc[0] in here and cooc[1] not in here:
            adv += [(i, cooc[1], False), (i, rng.choice(here), True)]
    return {"random": rand, **({"adversarial": adv} if cooc is not None else {})}


def pope_scores(answers: Sequence[bool], labels: Sequence[bool]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio (percent) of yes/no answers."""
    tp = sum(a and b for a, b in zip(answers, labels))
    fp = sum(a and not b for a, b in zip(answers, labels))
    fn = sum(b and not a for a, b in zip(answers, labels))
    n = len(labels)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": 100.0 * sum(a == b for a, b in zip(answers, labels)) / n if n else float("nan"),
        "precision": 100.0 * prec,
        "recall": 100.0 * rec,
        "f1": 100.0 * (2 * prec * rec / (prec + rec) if prec + rec else 0.0),
        "yes_ratio": 100.0 * sum(answers) / n if n else float("nan"),
    }


def pope(
    outputs: Sequence[str],
    scenes: Sequence[Scene],
    seed: int = 0,
    cooc: tuple[Ident, Ident] | None = None,
) -> dict[str, float]:
    """POPE-style probe answered by the captions: `pope/<accuracy|f1|yes_ratio|…>` on the random
    split, `pope_adv/…` on the adversarial (co-occurrence) split."""
    parsed = [parse(o) for o in outputs]
    res: dict[str, float] = {}
    for name, qs in pope_queries(scenes, seed, cooc).items():
        if not qs:
            continue
        answers = [mentions_object(parsed[i], *u) for i, u, _ in qs]
        key = "pope" if name == "random" else "pope_adv"
        res.update({f"{key}/{k}": v for k, v in pope_scores(answers, [y for *_, y in qs]).items()})
    return res
