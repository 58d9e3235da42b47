"""Caption sources: where records come from, and what counts as a negative for them.

A source hides the dataset: the datamodules only ask for caption records of a split, a
dataset negative of a given difficulty, and whether a candidate text is (as good as) a
positive — so on-policy sampling can drop samples that are not actually wrong.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from cwdpo.data import shapes
from cwdpo.data.records import CaptionRecord, DataError, normalize
from cwdpo.data.verifier import minimal_negative, verify


class CaptionSource(Protocol):
    prompt: str

    def captions(self, split: str) -> list[CaptionRecord]: ...

    def negative(
        self, record: CaptionRecord, rng: random.Random, hard: bool, chosen: str | None = None
    ) -> tuple[str, str]:
        """A dataset negative for `record`: (text, source), gentle/hard or easy. `chosen` is the
        positive it will be paired with (sources that build minimal pairs edit it)."""
        ...

    def is_positive(self, text: str, record: CaptionRecord) -> bool: ...

    def score(self, text: str, record: CaptionRecord) -> float | None:
        """Ground-truth quality in [0, 1] when the source knows it (ShapesWorld facts)."""
        ...


def matches_reference(text: str, record: CaptionRecord) -> bool:
    """A sample counts as a positive when it equals a reference after normalisation."""
    return normalize(text) in {normalize(r) for r in record.references}


def draw_negative(
    source: CaptionSource,
    record: CaptionRecord,
    rng: random.Random,
    hard: bool | Callable[[], bool],
    chosen: str | None = None,
    accept: Callable[[str], bool] | None = None,
    tries: int = 5,
) -> tuple[str, str] | None:
    """The one "draw until the negative is not a positive" loop: up to `tries` draws of
    `source.negative`, the first (text, source) that `accept`s, else None. `accept` defaults
    to "neither a positive nor a reference"; `hard` may be a callable drawn before each try."""
    if accept is None:

        def accept(text: str) -> bool:
            return not source.is_positive(text, record) and text not in record.references

    for _ in range(tries):
        text, src = source.negative(
            record, rng, hard=hard() if callable(hard) else hard, chosen=chosen
        )
        if accept(text):
            return text, src
    return None


@dataclass
class ShapesSource:
    """ShapesWorld captions; sizes per split are config values."""

    world: shapes.WorldConfig = field(default_factory=shapes.WorldConfig)
    seed: int = 0
    sizes: dict[str, int] = field(
        default_factory=lambda: {"train": 2000, "val": 100, "test": 200, "probe": 64}
    )
    prompt: str = shapes.PROMPT
    judge: str = "precision"  # score(): "precision" (facts %) | "verifier" (F1 × parsed share)
    # hard negatives as one-fact edits of the chosen caption itself (same template and object
    # order); false keeps the old independent-template draw (the committed ShapesWorld study)
    minimal_negatives: bool = False

    def __post_init__(self) -> None:
        if self.judge not in ("precision", "verifier"):
            raise DataError(
                f"data.source.judge must be 'precision' or 'verifier', got {self.judge!r}"
            )
        if isinstance(self.world, Mapping):
            w = dict(self.world)
            for k in (
                "colours",
                "shapes",
                "sizes",
                "positions",
                "templates",
                "cooc_trigger",
                "cooc_companion",
            ):
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

    @property
    def cooc(self) -> tuple[tuple[str, str], tuple[str, str]] | None:
        """(trigger, companion) of the co-occurrence rule, None in the clean world."""
        w = self.world
        return None if w.cooc_trigger is None else (tuple(w.cooc_trigger), tuple(w.cooc_companion))

    def base_records(self) -> list[CaptionRecord] | None:
        """The base-SFT split (`sizes.base`), disjoint from stage-1/2 images; None = use train."""
        return self.captions("base") if "base" in self.sizes else None

    def negative(
        self, record: CaptionRecord, rng: random.Random, hard: bool, chosen: str | None = None
    ) -> tuple[str, str]:
        scene = record.meta["scene"]
        if hard and self.minimal_negatives and chosen is not None:
            w = self.world
            out = minimal_negative(
                chosen,
                scene,
                rng,
                {"colour": w.colours, "shape": w.shapes, "size": w.sizes, "position": w.positions},
            )
            if out is not None:
                return out
        t = rng.choice(self.world.templates)
        if hard:
            return shapes.hard_negative(scene, t, rng, self.world)
        pool = self.captions(record.split) if record.split in self.sizes else [record]
        other = rng.choice(pool).meta["scene"]
        return shapes.easy_negative(scene, other, t, rng)

    def is_positive(self, text: str, record: CaptionRecord) -> bool:
        """Exactly right by the full-grammar verifier: gold + junk or an omission is no positive."""
        return verify(text, record.meta["scene"]).exact

    def score(self, text: str, record: CaptionRecord) -> float | None:
        """Facts precision (`judge: precision`, the old "facts %") or the verifier's junk- and
        omission-aware F1 score (`judge: verifier`)."""
        if self.judge == "verifier":
            return verify(text, record.meta["scene"]).score
        return shapes.fact_accuracy(text, record.meta["scene"])


@dataclass
class CaptionFileSource:
    """COCO / Flickr30k (Karpathy JSON) or NoCaps captions read from a user-given root.

    Dataset negatives: easy = a caption of another image, hard/gentle = one object noun,
    colour, number or spatial word swapped using vocabulary mined from the training captions.
    A sample counts as a positive when it matches a reference after normalisation.
    """

    format: str  # "karpathy" | "nocaps"
    annotations: str
    image_root: str
    splits: dict[str, str] = field(
        default_factory=lambda: {"train": "train", "val": "val", "test": "test"}
    )
    prompt: str = "Describe the image in one sentence."
    sizes: dict[str, int] | None = None  # cap on rows per split (same knob as ShapesWorld's)
    skip_bad_images: bool = False
    check_images: bool = True  # decode every image when the split is read (not mid-training)

    def __post_init__(self) -> None:
        if self.format not in ("karpathy", "nocaps"):
            raise DataError(
                f"data.source.format must be 'karpathy' or 'nocaps', got {self.format!r}"
            )
        self._cache: dict[str, list[CaptionRecord]] = {}
        self._vocab = None

    def captions(self, split: str) -> list[CaptionRecord]:
        if split not in self._cache:
            if split not in self.splits:
                raise DataError(
                    f"no file split mapped for {split!r}; data.source.splits = {self.splits}"
                )
            if self.format == "karpathy":
                from cwdpo.data.karpathy import read_karpathy

                recs = read_karpathy(
                    self.annotations,
                    self.image_root,
                    splits=(self.splits[split],),
                    skip_bad_images=self.skip_bad_images,
                    check_images=self.check_images,
                )
            else:
                from cwdpo.data.nocaps import read_nocaps

                recs = read_nocaps(
                    self.annotations,
                    self.image_root,
                    split=self.splits[split],
                    skip_bad_images=self.skip_bad_images,
                    check_images=self.check_images,
                )
            limit = (self.sizes or {}).get(split)
            recs = recs[: int(limit)] if limit else recs
            if not recs:
                raise DataError(f"{self.annotations}: split {split!r} has no rows")
            self._cache[split] = recs
        return self._cache[split]

    @property
    def vocab(self):
        from cwdpo.data.caption_negatives import CaptionVocab

        if self._vocab is None:
            self._vocab = CaptionVocab.mine(self.captions("train"))
        return self._vocab

    def negative(
        self, record: CaptionRecord, rng: random.Random, hard: bool, chosen: str | None = None
    ) -> tuple[str, str]:
        from cwdpo.data.caption_negatives import easy_negative, hard_negative

        if hard:
            out = hard_negative(rng.choice(record.references), self.vocab, rng, record.references)
            if out is not None:
                return out
        pool = self.captions("train") if record.split == "train" else self.captions(record.split)
        return easy_negative(record, pool, rng)

    def is_positive(self, text: str, record: CaptionRecord) -> bool:
        return matches_reference(text, record)

    def score(self, text: str, record: CaptionRecord) -> float | None:
        return None


@dataclass
class PreferenceFileSource:
    """TRL-style preference data (JSONL or a local HF `datasets` dir: images/prompt/chosen/rejected).

    Each pair becomes a caption record whose reference is `chosen` and whose dataset negative
    is its own `rejected` (source "trl"), so stage 1 (gentle negatives) and stage 2 (pairs) use
    RLAIF-V-style data unchanged. Held-out splits are the last rows, by `holdout` counts.
    """

    path: str
    image_root: str | None = None
    holdout: dict[str, int] = field(default_factory=lambda: {"val": 32, "test": 64, "probe": 32})
    prompt: str = "Describe the image."
    sizes: dict[str, int] | None = None  # cap on rows per split (same knob as ShapesWorld's)
    skip_bad_images: bool = False
    check_images: bool = True  # decode every image when the file is read (not mid-training)

    def __post_init__(self) -> None:
        from cwdpo.data.trl_pairs import read_preference_pairs

        pairs = read_preference_pairs(
            self.path, self.image_root, skip_bad_images=self.skip_bad_images
        )
        for i, p in enumerate(pairs):
            if normalize(p.chosen) == normalize(p.rejected):
                raise DataError(
                    f"{self.path}: row {i} ({p.image_id}): chosen and rejected are the "
                    f"same text after normalisation ({p.chosen!r})"
                )
        recs = [
            CaptionRecord(
                image_id=p.image_id,
                image=p.image,
                references=[p.chosen],
                split="train",
                meta={"prompt": p.prompt, "rejected": p.rejected, **p.meta},
            )
            for p in pairs
        ]
        if self.check_images:
            from cwdpo.data.image_check import check_record_images

            rows = [f"row {i} ({r.image_id})" for i, r in enumerate(recs)]  # as the reader counts
            recs = check_record_images(recs, rows, self.path, skip_bad_images=self.skip_bad_images)
        n_hold = sum(self.holdout.values())
        if len(recs) <= n_hold:
            raise DataError(
                f"{self.path}: {len(recs)} pairs, not enough for the held-out splits {self.holdout} "
                "plus training rows (lower data.source.holdout)"
            )
        self._splits: dict[str, list[CaptionRecord]] = {"train": recs[: len(recs) - n_hold]}
        start = len(recs) - n_hold
        for name, n in self.holdout.items():
            self._splits[name] = recs[start : start + n]
            start += n

    def captions(self, split: str) -> list[CaptionRecord]:
        if not self._splits.get(split):
            raise DataError(f"{self.path}: split {split!r} has no rows (data.source.holdout)")
        limit = (self.sizes or {}).get(split)
        return self._splits[split][: int(limit)] if limit else self._splits[split]

    def negative(
        self, record: CaptionRecord, rng: random.Random, hard: bool, chosen: str | None = None
    ) -> tuple[str, str]:
        return record.meta["rejected"], "trl"

    def is_positive(self, text: str, record: CaptionRecord) -> bool:
        return matches_reference(text, record)

    def score(self, text: str, record: CaptionRecord) -> float | None:
        return None
