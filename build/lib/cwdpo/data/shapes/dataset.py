"""A seeded ShapesWorld as datasets: caption records and offline preference pairs per split.

Why its own module: the split streams (seeding, the co-occurrence shift between stages, the
noisy annotator) are the dataset's contract, separate from how one scene is drawn or judged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import partial

from cwdpo.data.records import CaptionRecord, ImageRef, PreferenceRecord
from cwdpo.data.shapes import world as W
from cwdpo.data.shapes.negatives import easy_negative, hard_negative


@dataclass
class ShapesWorld:
    """A seeded world: `captions(split)` and `pairs(split)` are deterministic in the seed."""

    cfg: W.WorldConfig = field(default_factory=W.WorldConfig)
    seed: int = 0

    def cooc_prob(self, split: str, i: int, n: int) -> float:
        """P(companion | trigger) of row i of n: base / stage-1 rows at `cooc_prob`, stage-2
        rows (train from `shift_from` on) and held-out splits at `cooc_prob_shift`."""
        if split == "base" or (split == "train" and i < round(self.cfg.shift_from * n)):
            return self.cfg.cooc_prob
        return self.cfg.cooc_prob_shift

    def scenes(self, split: str, n: int) -> list[W.Scene]:
        # Split-specific streams never overlap: the split name is part of the seed.
        base = {"train": 0, "val": 1, "test": 2, "probe": 3, "base": 5}.get(split, 4) * 10_000_019
        rng = random.Random(self.seed * 7919 + base)
        if self.cfg.cooc_trigger is None:
            return [
                W.sample_scene(rng, self.cfg, seed=base + self.seed * 131 + i) for i in range(n)
            ]
        return [
            W.sample_scene(rng, self.cfg, base + self.seed * 131 + i, self.cooc_prob(split, i, n))
            for i in range(n)
        ]

    def captions(self, split: str, n: int) -> list[CaptionRecord]:
        """Caption records; base/train references come from the (noisy) annotator, held-out
        ones from the truth. `meta["scene"]` is always the truth the verifier judges against."""
        out = []
        for i, sc in enumerate(self.scenes(split, n)):
            seen = W.annotate(sc, self.cfg) if split in ("base", "train") else sc
            out.append(
                CaptionRecord(
                    image_id=f"shapes-{split}-{i}",
                    image=ImageRef(factory=partial(W.render_scene, sc), name=f"shapes-{split}-{i}"),
                    references=W.references(seen, self.cfg.templates),
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
            chosen = W.caption(sc, t)
            if rng.random() < easy_fraction:
                rejected, src = easy_negative(sc, scenes[(i + 1) % len(scenes)], t, rng)
            else:
                rejected, src = hard_negative(sc, t, rng, self.cfg)
            refs = W.references(sc, self.cfg.templates)
            if rejected in refs:  # a perturbation that lands on a true caption is no negative
                rejected, src = hard_negative(sc, t, rng, self.cfg)
            if rejected in refs:
                continue
            out.append(
                PreferenceRecord(
                    image_id=f"shapes-{split}-{offset + i}",
                    image=ImageRef(factory=partial(W.render_scene, sc), name=f"shapes-{split}-{i}"),
                    prompt=W.PROMPT,
                    chosen=chosen,
                    rejected=rejected,
                    source=src,
                    meta={"scene": sc, "references": refs},
                )
            )
        return out
