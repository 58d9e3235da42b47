"""The ShapesWorld itself: its words, scenes, rendering, sampling and caption templates.

Everything here is pure and seeded, so the facts checker (`facts`), the negatives
(`negatives`) and the datasets (`dataset`) can all rebuild the same scene from a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

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
    return _scene(objects, seed, cfg)


def _scene(objects: list[Obj], seed: int, cfg: WorldConfig, faint_companion: bool = False) -> Scene:
    """A scene at the world's canvas size and noise; in the testbed the companion is drawn faint."""
    if not faint_companion:
        return Scene(objects, seed=seed, image_size=cfg.image_size, noise=cfg.noise)
    return Scene(
        objects, seed, cfg.image_size, cfg.noise, cfg.cooc_companion, cfg.companion_contrast
    )


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
    return _scene(objects, seed, cfg, faint_companion=True)


def annotator_rng(scene: Scene) -> random.Random:
    """The noisy annotator's rng for a scene: seeded by the scene, so annotation is deterministic
    (`annotate`, and the companion edits that insert a companion where it would)."""
    return random.Random(scene.seed * 2_654_435_761 % 2**32)


def annotate(scene: Scene, cfg: WorldConfig) -> Scene:
    """What a noisy annotator saw: with prob `hallucination_rate`, a trigger scene without its
    companion gets one anyway (small, at a free position). Seeded by the scene: deterministic."""
    if cfg.cooc_trigger is None or cfg.hallucination_rate <= 0:
        return scene
    ids = {(o.colour, o.shape) for o in scene.objects}
    if cfg.cooc_trigger not in ids or cfg.cooc_companion in ids:
        return scene
    rng = annotator_rng(scene)
    free = [p for p in cfg.positions if p not in {o.position for o in scene.objects}]
    if not free or rng.random() >= cfg.hallucination_rate:
        return scene
    objs = sorted(
        [*scene.objects, Obj(*cfg.cooc_companion, "small", rng.choice(free))],
        key=lambda o: _ORDER[o.position],
    )
    return replace(scene, objects=objs)


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


def vocabulary() -> list[str]:
    """Every word ShapesWorld can emit (captions, negatives, prompt): the tiny tokenizer's corpus."""
    words = set(TEMPLATE_WORDS) | set(COLOURS) | set(SHAPES) | set(SIZES) | set(POSITIONS)
    words |= set(NUMBERS) | set(DISTRACTORS) | set(PROMPT.lower().replace(".", " ").split())
    words |= {"Describe"}
    return sorted(words)
