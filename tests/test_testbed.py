"""The co-occurrence testbed: rules, annotator noise, minimal pairs, self-judged pairs."""

from __future__ import annotations

import math
import random

import hydra
import numpy as np
import pytest

from cwdpo.batch import PairBatch
from cwdpo.callbacks.on_policy import policy_sampler, refresh_negatives
from cwdpo.data import shapes as S
from cwdpo.data.datamodules import CaptionDataModule, NegativeConfig, PreferenceDataModule
from cwdpo.data.shapes import Obj, Scene, ShapesWorld, WorldConfig
from cwdpo.data.sources import ShapesSource
from cwdpo.data.verifier import mentions_object, minimal_negative, verify, word_edit_distance
from tests.helpers import compose_cfg

COOC = dict(
    max_objects=3,
    templates=(0,),
    canonical_order=True,
    cooc_trigger=("red", "circle"),
    cooc_companion=("blue", "square"),
    hallucination_rate=0.3,
)


def _has(sc: Scene, ident: tuple[str, str]) -> bool:
    return any((o.colour, o.shape) == ident for o in sc.objects)


def _rate(scenes: list[Scene]) -> tuple[float, int]:
    trig = [sc for sc in scenes if _has(sc, ("red", "circle"))]
    return sum(_has(sc, ("blue", "square")) for sc in trig) / len(trig), len(trig)


def _within(rate: float, p: float, n: int) -> bool:
    return abs(rate - p) <= 4 * math.sqrt(p * (1 - p) / n)


def test_cooccurrence_rule_shifts_between_base_stage1_and_stage2_heldout():
    w = ShapesWorld(WorldConfig(**COOC), seed=0)
    base, train, test = w.scenes("base", 1600), w.scenes("train", 1600), w.scenes("test", 800)
    for scenes, p in ((base, 0.8), (train[:1200], 0.8), (train[1200:], 0.5), (test, 0.5)):
        r, n = _rate(scenes)
        assert n > 150 and _within(r, p, n), (p, r, n)
    for sc in base + test:  # the companion never appears without its trigger, always small
        assert not _has(sc, ("blue", "square")) or _has(sc, ("red", "circle"))
        assert all(
            o.size == "small" for o in sc.objects if (o.colour, o.shape) == ("blue", "square")
        )
        order = [S.POSITIONS.index(o.position) for o in sc.objects]
        assert order == sorted(order) and len(sc.objects) <= 3


def test_annotator_noise_hallucinates_companions_at_rate_h_in_training_only():
    for h in (0.0, 0.3):
        src = ShapesSource(
            WorldConfig(**{**COOC, "hallucination_rate": h}),
            seed=1,
            sizes={"base": 1500, "train": 200, "val": 8, "test": 400, "probe": 8},
        )
        eligible = [
            r
            for r in src.captions("base")
            if _has(r.meta["scene"], ("red", "circle"))
            and not _has(r.meta["scene"], ("blue", "square"))
        ]
        noisy = [r for r in eligible if mentions_object(r.references[0], "blue", "square")]
        rate = len(noisy) / len(eligible)
        assert len(eligible) > 80 and (
            rate == 0.0 if h == 0 else _within(rate, h, len(eligible))
        ), rate
        for r in noisy:  # the noisy caption is well-formed but no positive: the truth judges
            v = verify(r.references[0], r.meta["scene"])
            assert (
                not v.malformed and v.hallucinated == 1 and not src.is_positive(r.references[0], r)
            )
        for r in src.captions("test"):  # held-out references are the truth
            assert src.is_positive(r.references[0], r)


def test_companion_is_drawn_faint():
    sc = Scene(
        [Obj("blue", "square", "small", "left")],
        0,
        32,
        0.0,
        faint=("blue", "square"),
        faint_contrast=0.35,
    )
    px = np.asarray(sc.render())[16, 8].astype(float)
    want = 245 + 0.35 * (np.array(S.COLOURS["blue"]) - 245)
    assert np.abs(px - want).max() <= 1
    full = np.asarray(Scene(sc.objects, 0, 32, 0.0).render())[16, 8]
    assert tuple(full) == S.COLOURS["blue"]


def test_world_config_errors_name_the_key():
    with pytest.raises(ValueError, match="hallucination_rate"):
        WorldConfig(**{**COOC, "hallucination_rate": 1.5})
    with pytest.raises(ValueError, match="cooc_trigger"):
        WorldConfig(**{**COOC, "cooc_trigger": ("pink", "circle")})


# ------------------------------------------------------------------------- minimal pairs
def _one_word_edit(a: str, b: str) -> bool:
    return word_edit_distance(a, b) == 1 and len(a.split()) == len(b.split())


def _pref_dm(src: ShapesSource, **neg) -> PreferenceDataModule:
    if neg.get("kind") == "self_judged":
        neg.setdefault("dataset_fraction", 0.0)
    dm = PreferenceDataModule(
        src,
        src.captions("train"),
        batch_size=8,
        seed=0,
        negatives=NegativeConfig(**neg),
        collate=lambda *a: {},
        collate_pairs=lambda *a: {},
    )
    dm.trainer = None
    return dm


def _judged_source() -> ShapesSource:
    """The testbed world with minimal negatives and the verifier as judge (40 train images)."""
    return ShapesSource(
        WorldConfig(**COOC),
        seed=0,
        minimal_negatives=True,
        judge="verifier",
        sizes={"train": 40, "val": 4, "test": 4, "probe": 4},
    )


def _draw(dm, n_batches: int) -> list[PairBatch]:
    out = []
    while len(out) < n_batches:
        for b in dm.train_dataloader():
            out.append(dm.on_before_batch_transfer(b, 0))
            if len(out) == n_batches:
                break
    return out


@pytest.mark.parametrize("world", [COOC, {}])  # the testbed and the default (1–2 object) world
def test_hard_negatives_are_one_fact_edits_of_the_chosen(world):
    src = ShapesSource(
        WorldConfig(**world),
        seed=0,
        minimal_negatives=True,
        sizes={"train": 200, "val": 4, "test": 4, "probe": 4},
    )
    batches = _draw(_pref_dm(src, easy_fraction=0.0), 40)
    pairs = [(c, r) for b in batches for c, r in zip(b.chosen, b.rejected)]
    rate = sum(_one_word_edit(c, r) for c, r in pairs) / len(pairs)
    assert len(pairs) == 320 and rate >= 0.95, rate
    for b in batches:
        for c, r, i in zip(b.chosen, b.rejected, b.image_ids):
            rec = next(x for x in src.captions("train") if x.image_id == i)
            assert verify(r, rec.meta["scene"]).score < verify(c, rec.meta["scene"]).score
    # stage 1's gentle negatives too
    seen = []
    dm = CaptionDataModule(
        src,
        src.captions("train"),
        batch_size=8,
        seed=0,
        gentle_negatives=True,
        collate=lambda *a: {},
        collate_pairs=lambda im, pr, pos, neg: seen.extend(zip(pos, neg)) or {},
    )
    dm.trainer = None
    for b in dm.train_dataloader():
        dm.on_before_batch_transfer(b, 0)
    assert sum(_one_word_edit(c, r) for c, r in seen) / len(seen) >= 0.95


def test_old_independent_template_draw_is_not_minimal():
    """The null-control default (minimal_negatives off) reproduces the review's finding."""
    src = ShapesSource(WorldConfig(), seed=0, sizes={"train": 200, "val": 4, "test": 4, "probe": 4})
    pairs = [
        (c, r)
        for b in _draw(_pref_dm(src, easy_fraction=0.0), 40)
        for c, r in zip(b.chosen, b.rejected)
    ]
    assert sum(_one_word_edit(c, r) for c, r in pairs) / len(pairs) < 0.5


def test_minimal_negative_edits_noisy_and_own_captions_and_refuses_junk():
    sc = Scene([Obj("red", "circle", "small", "left")], 0)
    rng = random.Random(0)
    text = "there is one shape : a small red circle on the left ."
    kinds = set()
    for _ in range(200):
        out, kind = minimal_negative(text, sc, rng)
        assert _one_word_edit(text, out) and verify(out, sc).score < 1.0
        kinds.add(kind)
    assert kinds == {"hard:colour", "hard:shape", "hard:size", "hard:position", "hard:count"}
    assert minimal_negative("banana guitar .", sc, rng) is None


# ------------------------------------------------------------------------- self-judged pairs
class ScriptedPolicy:
    """Per image: the truth, a one-fact-wrong caption, the truth + junk and a wrong-colour one."""

    def __init__(self, src: ShapesSource) -> None:
        self.by_image = {}
        for r in src.captions("train"):
            t = (
                r.references[0]
                if src.is_positive(r.references[0], r)
                else S.caption(r.meta["scene"], 0)
            )
            self.by_image[len(self.by_image)] = [
                t,
                minimal_negative(t, r.meta["scene"], random.Random(1))[0],
                t[:-2] + " banana banana .",
                "banana .",
            ]

    def __call__(self, images, prompts, num_return_sequences=1, **kw):
        start = self.calls if hasattr(self, "calls") else 0
        self.calls = start + len(images)
        return [
            s
            for i in range(start, start + len(images))
            for s in self.by_image[i][:num_return_sequences]
        ]


def test_self_judged_pairs_are_best_vs_worst_by_the_verifier():
    src = _judged_source()
    dm = _pref_dm(src, kind="self_judged", num_samples=4, generation_batch_size=7)
    stats = refresh_negatives(dm, policy_sampler(ScriptedPolicy(src)), step=0)
    assert stats["self_judged/pairs"] == 40
    by_id = {r.image_id: r for r in src.captions("train")}
    for b in _draw(dm, 10):
        for c, r, i, s in zip(b.chosen, b.rejected, b.image_ids, b.sources):
            sc = by_id[i].meta["scene"]
            assert verify(c, sc).exact and r == "banana ." and s == "self:worst"
    # with K = 2 the best and the one-fact edit differ by 1/8..1/4 of F1: a gap of 0.5 is not met,
    # so the pair falls back to the best sample and a one-fact edit of it
    dm = _pref_dm(src, kind="self_judged", num_samples=2, min_gap=0.5)
    assert (
        refresh_negatives(dm, policy_sampler(ScriptedPolicy(src)), step=0)["self_judged/no_gap"]
        == 40
    )
    for b in _draw(dm, 5):
        for c, r, s in zip(b.chosen, b.rejected, b.sources):
            assert s.startswith("self:minimal:hard:") and _one_word_edit(c, r)


def test_easy_mix_swaps_that_share_of_rejected_for_easy_negatives():
    src = _judged_source()
    dm = _pref_dm(src, kind="self_judged", num_samples=4, easy_mix=0.5)
    refresh_negatives(dm, policy_sampler(ScriptedPolicy(src)), step=0)
    easy = np.concatenate([b.neg_is_easy.numpy() for b in _draw(dm, 60)])
    assert _within(easy.mean(), 0.5, len(easy)) and easy.min() == 0 and easy.max() == 1
    with pytest.raises(ValueError, match="easy_mix"):
        NegativeConfig(kind="dataset", easy_mix=0.2)


def test_testbed_config_shifts_the_rule_exactly_where_stage_two_rows_start(tmp_path):
    """What the pipeline hands each stage (`stage_records`) under `data=shapes_cooc`: the base
    SFT its own images, stage 1 rows at `cooc_prob`, stage 2 rows at `cooc_prob_shift` (the
    world's shift lines up with data.stage_split), and the negatives node builds."""
    from cwdpo.run.pipeline import stage_records

    cfg = compose_cfg(["data=shapes_cooc", "negatives=self_judged"], tmp_path, tmp_path)
    src = hydra.utils.instantiate(cfg.data.source)
    rec = stage_records(cfg, src, ["base_sft", "sft_c", "cw_dpo"])
    w = cfg.data.source.world
    assert w.cooc_prob - w.cooc_prob_shift >= 0.2  # a shift the tests below can see
    scenes = {k: [r.meta["scene"] for r in rec[k]] for k in ("base_sft", "sft_c", "cw_dpo")}
    for part, p in (
        ("base_sft", w.cooc_prob),
        ("sft_c", w.cooc_prob),
        ("cw_dpo", w.cooc_prob_shift),
    ):
        trig = [sc for sc in scenes[part] if _has(sc, tuple(w.cooc_trigger))]
        rate = sum(_has(sc, tuple(w.cooc_companion)) for sc in trig) / len(trig)
        assert _within(rate, p, len(trig)), (part, rate, p, len(trig))
    assert not {r.image_id for r in rec["base_sft"]} & {r.image_id for r in src.captions("train")}
    NegativeConfig(**{k: v for k, v in cfg.negatives.items()})


def test_testbed_pipeline_end_to_end_with_self_judged_pairs(tmp_path, tiny_cache_dir):
    from cwdpo.run.pipeline import run_pipeline

    cfg = compose_cfg(
        [
            "+debug=fast",
            "data=shapes_cooc",
            "negatives=self_judged",
            "data.source.sizes.base=24",
            "eval.caption_metrics=false",
        ],
        tmp_path,
        tiny_cache_dir,
    )
    res = run_pipeline(cfg)
    neg = res["stages"]["cw_dpo"]["negatives"]
    assert set(neg["sources"]) and all(k.startswith("self:") for k in neg["sources"]), neg[
        "sources"
    ]
    assert neg["dataset_fraction"] == 0.0 and neg["refresh_steps"] == [0]
    m = res["stages"]["cw_dpo"]
    for key in ("companion_halluc", "pope_adv/accuracy", "disp/chosen_fell", "calib/content_ece"):
        assert key in m, key
    # the held-out curve (default callbacks): stage 2 only, from its start to its last step
    import csv

    with (tmp_path / "heldout.csv").open(newline="") as f:
        curve = list(csv.DictReader(f))
    assert {r["stage"] for r in curve} == {"cw_dpo"} and curve[0]["step"] == "0"
    assert int(curve[-1]["step"]) == cfg.stage.cw_dpo.steps
    assert all(r["split"] == "val" and "companion_halluc" in r and r["f1"] for r in curve)
