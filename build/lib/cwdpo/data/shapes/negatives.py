"""Graded ShapesWorld negatives: gentle (one fact perturbed) and easy (trivially wrong text).

Why graded: CW-DPO weights a pair by how hard its negative is, so the world must be able to
make both kinds on demand (`ShapesWorld.pairs`, `cwdpo.data.sources.ShapesSource`).
"""

from __future__ import annotations

import random

from cwdpo.data.shapes.world import DISTRACTORS, NUMBERS, Obj, Scene, WorldConfig, caption


def hard_negative(
    scene: Scene, template: int, rng: random.Random, cfg: WorldConfig
) -> tuple[str, str]:
    """One fact perturbed (colour, shape, size, position or count): a *gentle* negative."""
    kinds = ["colour", "shape", "size", "position"]
    if template == 1:
        kinds.append("count")
    kind = rng.choice(kinds)
    objs = list(scene.objects)
    if kind == "count":
        wrong = rng.choice([k for k in NUMBERS[1:] if k != NUMBERS[len(objs)]])
        text = caption(scene, template).replace(f" {NUMBERS[len(objs)]} ", f" {wrong} ", 1)
        return text, "hard:count"
    i = rng.randrange(len(objs))
    o = objs[i]
    pool = {
        "colour": cfg.colours,
        "shape": cfg.shapes,
        "size": cfg.sizes,
        "position": cfg.positions,
    }[kind]
    taken = {x.position for x in objs}
    choices = [v for v in pool if v != getattr(o, kind) and (kind != "position" or v not in taken)]
    if not choices:  # e.g. every position taken: fall back to colour, always possible
        kind, choices = "colour", [c for c in cfg.colours if c != o.colour]
    objs[i] = Obj(**{**vars(o), kind: rng.choice(choices)})
    return caption(Scene(objs, scene.seed, scene.image_size, scene.noise), template), f"hard:{kind}"


def easy_negative(scene: Scene, other: Scene, template: int, rng: random.Random) -> tuple[str, str]:
    """Trivially wrong text: another scene's caption, shuffled words, or off-distribution."""
    kind = rng.choice(["other", "shuffled", "off"])
    if kind == "other" and other.objects != scene.objects:
        return caption(other, template), "easy:other_image"
    if kind == "shuffled":
        words = caption(scene, template).split()
        for _ in range(10):
            rng.shuffle(words)
            text = " ".join(words)
            if text != caption(scene, template):
                return text, "easy:shuffled"
    n = rng.randint(4, 9)
    return " ".join(rng.choice(DISTRACTORS) for _ in range(n)) + " .", "easy:off_distribution"
