"""ShapesWorld: a procedural image-caption world with known ground truth.

Every scene is a few coloured shapes on a canvas; captions are generated from several
templates (so CIDEr has multiple references) and a parser turns any caption back into
facts, so we can say exactly which statements are wrong. Negatives come in graded
difficulty: *hard/gentle* (one attribute perturbed) and *easy* (another scene's caption,
shuffled words, off-distribution text).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from PIL import Image, ImageDraw

from cwdpo.data.records import CaptionRecord, ImageRef, PreferenceRecord

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
PROMPT = "Describe the image."
# Words used only by off-distribution easy negatives: in the tokenizer vocab, never in captions.
DISTRACTORS = (
    "banana",
    "guitar",
    "ocean",
    "sleeps",
    "quickly",
    "mountain",
    "purple-ish",
    "window",
    "coffee",
    "river",
    "dances",
    "cloud",
    "yesterday",
    "piano",
    "forest",
    "bright",
)
TEMPLATE_WORDS = (
    "a",
    "an",
    "the",
    "and",
    "there",
    "is",
    "are",
    "shapes",
    "shape",
    "on",
    "at",
    "in",
    "of",
    "picture",
    "image",
    "with",
    "this",
    "shows",
    "objects",
    "object",
    "describe",
    ".",
    ",",
    ":",
)


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    position: str

    def phrase(self, with_size: bool = True, with_position: bool = True) -> str:
        words = [self.size] if with_size else []
        words += [self.colour, self.shape]
        if with_position:
            words += ["on", "the", self.position]
        return " ".join(words)


@dataclass
class Scene:
    objects: list[Obj]
    seed: int
    image_size: int = 32
    noise: float = 0.0
    faint: tuple[str, str] | None = None  # (colour, shape) drawn at `faint_contrast` (companions)
    faint_contrast: float = 1.0

    def render(self) -> Image.Image:
        return render_scene(self)


@dataclass
class WorldConfig:
    """Difficulty knobs. Defaults are calibrated so a short base SFT gets a fraction of facts."""

    min_objects: int = 1
    max_objects: int = 2
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    sizes: tuple[str, ...] = SIZES
    positions: tuple[str, ...] = POSITIONS
    image_size: int = 32
    noise: float = 0.05
    templates: tuple[int, ...] = (0, 1, 2, 3)
    # --- the co-occurrence testbed (all off by default: the clean world is the null control) ---
    canonical_order: bool = False  # objects listed left, right, top, bottom: one caption per scene
    cooc_trigger: tuple[str, str] | None = None  # e.g. (red, circle); None = no rule
    cooc_companion: tuple[str, str] = ("blue", "square")  # always small, drawn faint
    trigger_rate: float = 0.5  # P(scene contains the trigger)
    cooc_prob: float = 0.8  # P(companion | trigger) in base / stage-1 data
    cooc_prob_shift: float = 0.5  # ... in stage-2 / val / test data
    shift_from: float = 0.75  # train rows from this fraction on are stage-2 (= data.stage_split)
    companion_contrast: float = 0.35  # 1 = full colour, 0 = invisible (background)
    hallucination_rate: float = (
        0.0  # annotator noise h: base/train captions add an absent companion
    )

    def __post_init__(self) -> None:
        for k in (
            "trigger_rate",
            "cooc_prob",
            "cooc_prob_shift",
            "shift_from",
            "companion_contrast",
            "hallucination_rate",
        ):
            v = getattr(self, k)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"data.source.world.{k} must be in [0, 1], got {v}")
        if self.cooc_trigger is not None:
            self.cooc_trigger, self.cooc_companion = (
                tuple(self.cooc_trigger),
                tuple(self.cooc_companion),
            )
            for k in ("cooc_trigger", "cooc_companion"):
                c, sh = getattr(self, k)
                if c not in self.colours or sh not in self.shapes:
                    raise ValueError(
                        f"data.source.world.{k}={[c, sh]}: colour must be one of "
                        f"{list(self.colours)} and shape one of {list(self.shapes)}"
                    )
            if self.cooc_trigger == self.cooc_companion:
                raise ValueError(
                    f"data.source.world.cooc_trigger and cooc_companion are both {self.cooc_trigger}"
                )
            if self.max_objects < 2:
                raise ValueError("the co-occurrence rule needs data.source.world.max_objects >= 2")


_SLOT = {  # (centre x, centre y) as fractions of the canvas
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
}


def render_scene(scene: Scene) -> Image.Image:
    s = scene.image_size
    img = Image.new("RGB", (s, s), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    rng = random.Random(scene.seed)
    bg = np.array((245, 245, 245), dtype=float)
    for o in scene.objects:
        cx, cy = _SLOT[o.position]
        r = (0.2 if o.size == "large" else 0.11) * s
        cx = cx * s + rng.uniform(-0.04, 0.04) * s
        cy = cy * s + rng.uniform(-0.04, 0.04) * s
        box = (cx - r, cy - r, cx + r, cy + r)
        col = COLOURS[o.colour]
        if scene.faint == (o.colour, o.shape):  # low contrast: blended toward the background
            col = tuple(int(round(v)) for v in bg + scene.faint_contrast * (np.array(col) - bg))
        if o.shape == "circle":
            draw.ellipse(box, fill=col)
        elif o.shape == "square":
            draw.rectangle(box, fill=col)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
    if scene.noise > 0:
        arr = np.asarray(img).astype(np.float32)
        nrng = np.random.default_rng(scene.seed)
        arr += nrng.normal(0, 255 * scene.noise, arr.shape)
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    return img


_ORDER = {p: i for i, p in enumerate(POSITIONS)}


def sample_scene(
    rng: random.Random, cfg: WorldConfig, seed: int, cooc_prob: float | None = None
) -> Scene:
    if cfg.cooc_trigger is not None:
        return _sample_cooc_scene(rng, cfg, seed, cfg.cooc_prob if cooc_prob is None else cooc_prob)
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    positions = rng.sample(list(cfg.positions), n)
    objects = [
        Obj(rng.choice(cfg.colours), rng.choice(cfg.shapes), rng.choice(cfg.sizes), p)
        for p in positions
    ]
    if cfg.canonical_order:
        objects.sort(key=lambda o: _ORDER[o.position])
    return Scene(objects, seed=seed, image_size=cfg.image_size, noise=cfg.noise)


def _sample_cooc_scene(rng: random.Random, cfg: WorldConfig, seed: int, p: float) -> Scene:
    """Trigger with prob `trigger_rate`; then the (small, faint) companion with prob `p`; other
    objects never take the trigger's or companion's identity, so only the rule governs them."""
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    positions = rng.sample(list(cfg.positions), len(cfg.positions))
    objects: list[Obj] = []
    special = {cfg.cooc_trigger, cfg.cooc_companion}
    if rng.random() < cfg.trigger_rate:
        objects.append(Obj(*cfg.cooc_trigger, rng.choice(cfg.sizes), positions.pop()))
        if rng.random() < p:
            objects.append(Obj(*cfg.cooc_companion, "small", positions.pop()))
    while len(objects) < n:
        c, sh = rng.choice(cfg.colours), rng.choice(cfg.shapes)
        if (c, sh) in special:
            continue
        objects.append(Obj(c, sh, rng.choice(cfg.sizes), positions.pop()))
    objects.sort(key=lambda o: _ORDER[o.position])  # the testbed's deterministic order
    return Scene(
        objects,
        seed=seed,
        image_size=cfg.image_size,
        noise=cfg.noise,
        faint=cfg.cooc_companion,
        faint_contrast=cfg.companion_contrast,
    )


def annotate(scene: Scene, cfg: WorldConfig) -> Scene:
    """What a noisy annotator saw: with prob `hallucination_rate`, a trigger scene without its
    companion gets one anyway (small, at a free position). Seeded by the scene: deterministic."""
    if cfg.cooc_trigger is None or cfg.hallucination_rate <= 0:
        return scene
    ids = {(o.colour, o.shape) for o in scene.objects}
    if cfg.cooc_trigger not in ids or cfg.cooc_companion in ids:
        return scene
    rng = random.Random(scene.seed * 2_654_435_761 % 2**32)
    free = [p for p in cfg.positions if p not in {o.position for o in scene.objects}]
    if not free or rng.random() >= cfg.hallucination_rate:
        return scene
    objs = sorted(
        [*scene.objects, Obj(*cfg.cooc_companion, "small", rng.choice(free))],
        key=lambda o: _ORDER[o.position],
    )
    return Scene(objs, scene.seed, scene.image_size, scene.noise, scene.faint, scene.faint_contrast)


def caption(scene: Scene, template: int) -> str:
    """Render one of several templates; all are parseable by `parse_caption`."""
    objs = scene.objects
    n = NUMBERS[len(objs)]
    if template == 0:
        return " and ".join(f"a {o.phrase()}" for o in objs) + " ."
    if template == 1:
        noun = "shape" if len(objs) == 1 else "shapes"
        verb = "is" if len(objs) == 1 else "are"
        return f"there {verb} {n} {noun} : " + " and ".join(f"a {o.phrase()}" for o in objs) + " ."
    if template == 2:
        return "a picture of " + " and ".join(f"a {o.phrase()}" for o in reversed(objs)) + " ."
    if template == 3:
        return (
            "this image shows "
            + " and ".join(f"a {o.phrase()}" for o in sorted(objs, key=lambda o: o.position))
            + " ."
        )
    raise ValueError(f"unknown template {template}")


def references(scene: Scene, templates: tuple[int, ...] = (0, 1, 2, 3)) -> list[str]:
    return [caption(scene, t) for t in templates]


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
    # Optimal one-to-one matching of mentions to scene objects (≤ 4 objects: ≤ 16 states),
    # so mention order can never steal the object another mention describes exactly.
    best = {0: (0, 0)}  # used-object bitmask -> (correct facts, exact objects)
    for row in agree:
        nxt: dict[int, tuple[int, int]] = {}
        for used, (c, e) in best.items():
            free = [i for i in range(len(objs)) if not used >> i & 1]
            for i in free or [None]:
                key = used if i is None else used | 1 << i
                val = (c, e) if i is None else (c + row[i], e + (row[i] == 4))
                if val > nxt.get(key, (-1, -1)):
                    nxt[key] = val
        best = nxt
    correct, exact_objs = max(best.values())
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


# ---------------------------------------------------------------- negatives
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


# ---------------------------------------------------------------- datasets
@dataclass
class ShapesWorld:
    """A seeded world: `captions(split)` and `pairs(split)` are deterministic in the seed."""

    cfg: WorldConfig = field(default_factory=WorldConfig)
    seed: int = 0

    def cooc_prob(self, split: str, i: int, n: int) -> float:
        """P(companion | trigger) of row i of n: base / stage-1 rows at `cooc_prob`, stage-2
        rows (train from `shift_from` on) and held-out splits at `cooc_prob_shift`."""
        if split == "base" or (split == "train" and i < round(self.cfg.shift_from * n)):
            return self.cfg.cooc_prob
        return self.cfg.cooc_prob_shift

    def scenes(self, split: str, n: int) -> list[Scene]:
        # Split-specific streams never overlap: the split name is part of the seed.
        base = {"train": 0, "val": 1, "test": 2, "probe": 3, "base": 5}.get(split, 4) * 10_000_019
        rng = random.Random(self.seed * 7919 + base)
        if self.cfg.cooc_trigger is None:
            return [sample_scene(rng, self.cfg, seed=base + self.seed * 131 + i) for i in range(n)]
        return [
            sample_scene(rng, self.cfg, base + self.seed * 131 + i, self.cooc_prob(split, i, n))
            for i in range(n)
        ]

    def captions(self, split: str, n: int) -> list[CaptionRecord]:
        """Caption records; base/train references come from the (noisy) annotator, held-out
        ones from the truth. `meta["scene"]` is always the truth the verifier judges against."""
        out = []
        for i, sc in enumerate(self.scenes(split, n)):
            seen = annotate(sc, self.cfg) if split in ("base", "train") else sc
            out.append(
                CaptionRecord(
                    image_id=f"shapes-{split}-{i}",
                    image=ImageRef(factory=partial(render_scene, sc), name=f"shapes-{split}-{i}"),
                    references=references(seen, self.cfg.templates),
                    split=split,
                    meta={"scene": sc, **({"annotated_scene": seen} if seen is not sc else {})},
                )
            )
        return out

    def pairs(
        self, split: str, n: int, easy_fraction: float = 0.5, offset: int = 0
    ) -> list[PreferenceRecord]:
        """Dataset preference pairs with graded negatives; `easy_fraction` sets the mix."""
        scenes = self.scenes(split, n + offset)[offset:]
        rng = random.Random(self.seed * 31 + offset + 17)
        out = []
        for i, sc in enumerate(scenes):
            t = rng.choice(self.cfg.templates)
            chosen = caption(sc, t)
            if rng.random() < easy_fraction:
                rejected, src = easy_negative(sc, scenes[(i + 1) % len(scenes)], t, rng)
            else:
                rejected, src = hard_negative(sc, t, rng, self.cfg)
            refs = references(sc, self.cfg.templates)
            if rejected in refs:  # a perturbation that lands on a true caption is no negative
                rejected, src = hard_negative(sc, t, rng, self.cfg)
            if rejected in refs:
                continue
            out.append(
                PreferenceRecord(
                    image_id=f"shapes-{split}-{offset + i}",
                    image=ImageRef(factory=partial(render_scene, sc), name=f"shapes-{split}-{i}"),
                    prompt=PROMPT,
                    chosen=chosen,
                    rejected=rejected,
                    source=src,
                    meta={"scene": sc, "references": refs},
                )
            )
        return out


def vocabulary() -> list[str]:
    """Every word ShapesWorld can emit (captions, negatives, prompt): the tiny tokenizer's corpus."""
    words = set(TEMPLATE_WORDS) | set(COLOURS) | set(SHAPES) | set(SIZES) | set(POSITIONS)
    words |= set(NUMBERS) | set(DISTRACTORS) | set(PROMPT.lower().replace(".", " ").split())
    words |= {"Describe"}
    return sorted(words)
