"""Negatives: dataset / on-policy / mixed, on ShapesWorld and on a COCO-format fixture."""

from __future__ import annotations

import math
import random

import lightning as L
import pytest
import torch

from cwdpo.callbacks.on_policy import OnPolicyNegatives, policy_sampler, refresh_negatives
from cwdpo.data.datamodules import NegativeConfig, PreferenceDataModule
from cwdpo.data.shapes import WorldConfig
from cwdpo.data.sources import ShapesSource
from cwdpo.run.pipeline import run_pipeline
from cwdpo.stages import CWDPOModule
from tests.formats import write_karpathy
from tests.helpers import compose_cfg


def _source(n: int = 24) -> ShapesSource:
    return ShapesSource(WorldConfig(), seed=0, sizes={"train": n, "val": 4, "test": 4, "probe": 4})


def _dm(kind: str, fraction: float, n: int = 24, backbone=None, **neg) -> PreferenceDataModule:
    src = _source(n)
    cfg = NegativeConfig(kind=kind, dataset_fraction=fraction, **neg)
    collate = (backbone.collate, backbone.collate_pairs) if backbone else (lambda *a: {},) * 2
    return PreferenceDataModule(
        src,
        src.captions("train"),
        batch_size=4,
        seed=0,
        negatives=cfg,
        collate=collate[0],
        collate_pairs=collate[1],
    )


class FakePolicy:
    """Generation stand-in: returns a true reference for one sample in three, else junk."""

    def __init__(self, source: ShapesSource) -> None:
        self.source, self.calls = source, 0
        self.by_prompt_image: list[str] = []

    def __call__(self, images, prompts, num_return_sequences=1, **kw):
        self.calls += 1
        out = []
        recs = self.source.captions("train")
        for i in range(len(images) * num_return_sequences):
            rec = recs[(i // num_return_sequences) % len(recs)]
            out.append(
                rec.references[0] if i % 3 == 0 else f"a purple circle on the top {self.calls} {i}"
            )
        return out


def _batches(dm: PreferenceDataModule, n_batches: int):
    dm.trainer = None
    loader = dm.train_dataloader()
    out = []
    while len(out) < n_batches:
        for b in loader:
            out.append(dm.on_before_batch_transfer(b, 0))
            if len(out) == n_batches:
                break
    return out


def test_dataset_fraction_matches_the_knob_within_sampling_error():
    for p in (0.0, 0.25, 0.5, 1.0):
        dm = _dm("mixed", p)
        refresh_negatives(dm, policy_sampler(FakePolicy(dm.source)), step=0)
        batches = _batches(dm, 150)
        frac = torch.cat([b.neg_is_dataset for b in batches])
        n = frac.numel()
        tol = 4 * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-9
        assert abs(frac.mean().item() - p) <= tol, (p, frac.mean().item())
        assert dm.stats.on_policy_fallback == 0


def test_no_positive_is_ever_used_as_a_negative():
    dm = _dm("on_policy", 0.0, num_samples=3)
    stats = refresh_negatives(dm, policy_sampler(FakePolicy(dm.source)), step=0)
    assert stats["on_policy/dropped_as_positive"] > 0  # the fake policy did emit positives
    for b in _batches(dm, 60):
        idx_recs = {r.image_id: r for r in dm.train_records}
        for text, img in zip(b.rejected, b.image_ids):
            rec = idx_recs[img]
            assert text not in rec.references
            assert not dm.source.is_positive(text, rec)
    # the same holds for dataset negatives (easy + hard) over many draws
    dm = _dm("dataset", 1.0, easy_fraction=0.5)
    for b in _batches(dm, 60):
        for text, img, src in zip(b.rejected, b.image_ids, b.sources):
            rec = next(r for r in dm.train_records if r.image_id == img)
            assert not dm.source.is_positive(text, rec) and src != "on_policy"


def test_sources_are_recorded_for_every_negative():
    dm = _dm("mixed", 0.5, easy_fraction=0.5)
    refresh_negatives(dm, policy_sampler(FakePolicy(dm.source)), step=0)
    _batches(dm, 40)
    kinds = {k.split(":")[0] for k in dm.stats.counts}
    assert kinds == {"on_policy", "easy", "hard"}


def test_on_policy_negatives_are_refreshed_on_schedule(backbone):
    dm = _dm(
        "on_policy",
        0.0,
        n=8,
        backbone=backbone,
        num_samples=1,
        max_new_tokens=4,
        refresh_every_n_steps=3,
    )
    backbone.snapshot_reference()
    module = CWDPOModule(backbone, optimizer=lambda p: torch.optim.SGD(p, lr=1e-3), total_steps=7)
    cb = OnPolicyNegatives(every_n_steps=3)
    trainer = L.Trainer(
        max_steps=7,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[cb],
        limit_val_batches=0,
    )
    calls = []
    orig = dm.set_negatives

    def spy(samples, step):
        calls.append(step)
        return orig(samples, step)

    dm.set_negatives = spy
    trainer.fit(module, datamodule=dm)
    assert calls == [0, 3, 6]
    assert dm.stats.refresh_steps == [0, 3, 6]
    assert set(dm.buffer) <= {r.image_id for r in dm.train_records}


def test_refresh_counts_and_judges_every_record_of_a_shared_image():
    """A pair file can hold several records of one image: each record's samples are judged
    against that record and counted (as when the data module sampled), and the buffer keeps
    the samples of the image's last record."""
    src = _source(8)
    recs = src.captions("train")
    recs = recs + recs  # every image twice
    cfg = NegativeConfig(kind="on_policy", dataset_fraction=0.0, num_samples=3)
    dm = PreferenceDataModule(src, recs, batch_size=4, seed=0, negatives=cfg)
    calls = []

    def generate(images, prompts, num_return_sequences=1, **kw):
        calls.append(len(images))
        n = len(images) * num_return_sequences
        return [recs[0].references[0] if i % 3 == 0 else f"junk {len(calls)} {i}" for i in range(n)]

    stats = refresh_negatives(dm, policy_sampler(generate), step=0)
    assert sum(calls) == len(recs)  # one generation per record
    assert stats["on_policy/kept"] + stats["on_policy/dropped_as_positive"] == 3 * len(recs)
    assert stats["on_policy/dropped_as_positive"] == 2  # recs[0] in both copies
    assert dm.stats.rejected_as_positive == 2
    assert list(dm.buffer) == [r.image_id for r in recs[:8]]


def test_negative_config_rejects_bad_values():
    with pytest.raises(ValueError, match="dataset_fraction"):
        NegativeConfig(kind="mixed", dataset_fraction=1.5)
    with pytest.raises(ValueError, match="kind"):
        NegativeConfig(kind="sometimes")


@pytest.mark.parametrize("data", ["shapes", "coco"])
def test_cw_dpo_with_mixed_negatives_trains(data, tmp_path, tiny_cache_dir):
    over = [
        "+debug=fast",
        "negatives=mixed",
        "negatives.dataset_fraction=0.5",
        "negatives.num_samples=1",
        "negatives.max_new_tokens=6",
        "negatives.refresh_every_n_steps=1",
        "stage.run=[sft_c,cw_dpo]",
        "eval.caption_metrics=false",
        "eval.calibration=false",
        "eval.winrate=false",
    ]
    if data == "coco":
        fx = write_karpathy(tmp_path / "coco")
        over += [
            "data=coco_karpathy",
            f"data.root={tmp_path / 'coco'}",
            f"data.source.image_root={fx.image_root}",
            "data.batch_size=2",
            "data.num_workers=0",
            "data.stage_split={sft_c:0.5,cw_dpo:0.5}",
        ]
    cfg = compose_cfg(over, tmp_path / "run", tiny_cache_dir)
    res = run_pipeline(cfg)
    neg = res["stages"]["cw_dpo"]["negatives"]
    assert res["stages"]["cw_dpo"]["steps"] == 2
    assert neg["refresh_steps"][:2] == [0, 1]
    assert sum(neg["sources"].values()) >= 2
    assert 0.0 <= neg["dataset_fraction"] <= 1.0


def test_coco_hard_negatives_swap_mined_words(tmp_path):
    from cwdpo.data.sources import CaptionFileSource

    fx = write_karpathy(tmp_path)
    src = CaptionFileSource("karpathy", str(fx.path), str(fx.image_root))
    rng = random.Random(0)
    recs = src.captions("train")
    hard = [src.negative(r, rng, hard=True) for r in recs for _ in range(5)]
    assert any(s.startswith("hard:") for _, s in hard)
    for (text, _), r in zip(hard, [r for r in recs for _ in range(5)]):
        assert not src.is_positive(text, r)
    easy = src.negative(recs[0], rng, hard=False)
    assert easy[1] == "easy:other_image" and easy[0] not in recs[0].references


def test_validation_draws_are_fixed_and_leave_training_state_alone():
    dm = _dm("dataset", 1.0, n=8)
    dm.val_records = dm.source.captions("val")
    before = (dm.rng.getstate(), dict(dm.stats.counts))
    raw = next(iter(dm.val_dataloader()))
    with dm.evaluating():
        a = dm.on_before_batch_transfer(raw, 0)
        b = dm.on_before_batch_transfer(raw, 0)
    assert a.rejected == b.rejected and a.image_ids == [r.image_id for r in dm.val_records[:4]]
    assert (dm.rng.getstate(), dict(dm.stats.counts)) == before
