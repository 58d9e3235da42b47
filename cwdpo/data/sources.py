"""Caption sources: where records come from, and what counts as a negative for them.

A source hides the dataset: the datamodules only ask for caption records of a split, a
dataset negative of a given difficulty, and whether a candidate text is (as good as) a
positive — so on-policy sampling can drop samples that are not actually wrong.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from cwdpo.data import shapes
from cwdpo.data.records import CaptionRecord, DataError


class CaptionSource(Protocol):
    prompt: str

    def captions(self, split: str) -> list[CaptionRecord]: ...

    def negative(self, record: CaptionRecord, rng: random.Random, hard: bool) -> tuple[str, str]:
        """A dataset negative for `record`: (text, source), gentle/hard or easy."""
        ...

    def is_positive(self, text: str, record: CaptionRecord) -> bool: ...

    def score(self, text: str, record: CaptionRecord) -> float | None:
        """Ground-truth quality in [0, 1] when the source knows it (ShapesWorld facts)."""
        ...


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@dataclass
class ShapesSource:
    """ShapesWorld captions; sizes per split are config values."""

    world: shapes.WorldConfig = field(default_factory=shapes.WorldConfig)
    seed: int = 0
    sizes: dict[str, int] = field(default_factory=lambda: {"train": 2000, "val": 100, "test": 200, "probe": 64})
    prompt: str = shapes.PROMPT

    def __post_init__(self) -> None:
        if isinstance(self.world, Mapping):
            w = dict(self.world)
            for k in ("colours", "shapes", "sizes", "positions", "templates"):
                if k in w:
                    w[k] = tuple(w[k])
            self.world = shapes.WorldConfig(**w)
        self._world = shapes.ShapesWorld(self.world, self.seed)
        self._cache: dict[str, list[CaptionRecord]] = {}

    def captions(self, split: str) -> list[CaptionRecord]:
        if split not in self.sizes:
            raise DataError(f"ShapesWorld has no split {split!r}; configured: {sorted(self.sizes)}")
        if split not in self._cache:
            recs = self._world.captions(split, int(self.sizes[split]))
            if not recs:
                raise DataError(f"ShapesWorld split {split!r} has no rows (data.sizes.{split}=0)")
            self._cache[split] = recs
        return self._cache[split]

    def negative(self, record: CaptionRecord, rng: random.Random, hard: bool) -> tuple[str, str]:
        scene = record.meta["scene"]
        t = rng.choice(self.world.templates)
        if hard:
            return shapes.hard_negative(scene, t, rng, self.world)
        pool = self.captions(record.split) if record.split in self.sizes else [record]
        other = rng.choice(pool).meta["scene"]
        return shapes.easy_negative(scene, other, t, rng)

    def is_positive(self, text: str, record: CaptionRecord) -> bool:
        s = shapes.fact_scores(text, record.meta["scene"])
        return s["exact"] == 1.0 and s["accuracy"] == 1.0

    def score(self, text: str, record: CaptionRecord) -> float | None:
        return shapes.fact_accuracy(text, record.meta["scene"])
