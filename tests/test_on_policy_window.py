"""On-policy sampling at scale: a refresh samples exactly the records the next steps train on,
so its cost is refresh_every_n_steps × batch × K whatever the dataset size."""

from __future__ import annotations

import json

import pytest
import torch

from cwdpo.callbacks.on_policy import OnPolicyNegatives
from cwdpo.data.datamodules import NegativeConfig, PreferenceDataModule
from cwdpo.data.shapes import WorldConfig
from cwdpo.data.sources import ShapesSource
from cwdpo.stages import CWDPOModule
from tests.helpers import cpu_trainer


class CountingSampler:
    """A `CaptionSampler` stand-in: K junk captions per record, every call's records kept."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, records, prompt, neg):
        self.calls.append([r.image_id for r in records])
        n = len(self.calls)
        return [
            [f"a purple star on the top {n} {i} {k}" for k in range(neg.num_samples)]
            for i in range(len(records))
        ]


def _run(
    backbone,
    n_train: int,
    steps: int,
    every: int,
    batch_size: int = 4,
    accumulate=1,
    fraction: float = 0.0,
    tmp_path=None,
):
    src = ShapesSource(
        WorldConfig(), seed=0, sizes={"train": n_train, "val": 2, "test": 2, "probe": 2}
    )
    kind = "on_policy" if fraction == 0.0 else "mixed"
    neg = NegativeConfig(
        kind=kind, dataset_fraction=fraction, num_samples=2, refresh_every_n_steps=every
    )
    dm = PreferenceDataModule(
        src,
        src.captions("train"),
        batch_size=batch_size,
        seed=0,
        negatives=neg,
        collate=backbone.collate,
        collate_pairs=backbone.collate_pairs,
    )
    trained: list[list[str]] = []
    transfer = dm.on_before_batch_transfer

    def spy(batch, idx):
        out = transfer(batch, idx)
        if dm._training():
            trained.append(out.image_ids)
        return out

    dm.on_before_batch_transfer = spy
    backbone.snapshot_reference()
    module = CWDPOModule(
        backbone, optimizer=lambda p: torch.optim.SGD(p, lr=1e-4), total_steps=steps
    )
    sampler = CountingSampler()
    cb = OnPolicyNegatives(every_n_steps=every, sampler=sampler)
    trainer = cpu_trainer(tmp_path, steps, [cb], accumulate_grad_batches=accumulate)
    trainer.fit(module, datamodule=dm)
    return dm, sampler, trained


@pytest.mark.parametrize("n_train", [24, 240])
def test_refresh_samples_the_records_the_next_steps_train_on(backbone, tmp_path, n_train):
    """At 24 and at 240 training images (10×), 5 steps of batch 4 with a refresh every 2 steps
    sample 8 + 8 + 4 records: the records of the steps each refresh serves, never the
    dataset (today's main sampled all 24 / 240 at each of the 3 refreshes)."""
    dm, sampler, trained = _run(backbone, n_train, steps=5, every=2, tmp_path=tmp_path)
    assert [len(c) for c in sampler.calls] == [8, 8, 4]
    windows = [sum(trained[0:2], []), sum(trained[2:4], []), trained[4]]
    assert [sorted(c) for c in sampler.calls] == [sorted(set(w)) for w in windows]
    assert dm.stats.on_policy_fallback == 0  # every pair found its record's fresh samples
    assert dm.stats.counts == {"on_policy": 20}
    assert dm.stats.samples_per_pair() == pytest.approx(2.0)  # K, whatever the dataset size
    assert dm.stats.refresh_steps == [0, 2, 4]


def test_refresh_every_step_is_per_batch_on_policy(backbone, tmp_path):
    dm, sampler, trained = _run(backbone, 12, steps=4, every=1, tmp_path=tmp_path)
    assert [sorted(c) for c in sampler.calls] == [sorted(t) for t in trained]
    assert dm.stats.on_policy_fallback == 0


def test_window_crosses_epochs_and_counts_each_record_once(backbone, tmp_path):
    """8 images, batch 4: an epoch is 2 steps, so a 5-step window spans 3 epochs; each record
    is sampled once for it, and every pair of the window finds its samples."""
    dm, sampler, trained = _run(backbone, 8, steps=5, every=5, tmp_path=tmp_path)
    assert len(sampler.calls) == 1 and sorted(sampler.calls[0]) == sorted(set(sum(trained, [])))
    assert len(sampler.calls[0]) == 8
    assert dm.stats.on_policy_fallback == 0


def test_window_counts_accumulated_micro_batches(backbone, tmp_path):
    """accumulate_grad_batches=2: a 2-step window is 4 batches."""
    dm, sampler, trained = _run(backbone, 40, steps=3, every=2, accumulate=2, tmp_path=tmp_path)
    assert [len(c) for c in sampler.calls] == [16, 8]
    assert sorted(sampler.calls[0]) == sorted(set(sum(trained[:4], [])))
    assert dm.stats.on_policy_fallback == 0


def test_mixed_fraction_keeps_its_meaning(backbone, tmp_path):
    dm, sampler, trained = _run(backbone, 40, steps=6, every=3, fraction=0.5, tmp_path=tmp_path)
    assert dm.stats.on_policy_fallback == 0
    assert 0 < dm.stats.counts["on_policy"] < 24  # about half of the 24 pairs
    assert [len(c) for c in sampler.calls] == [12, 12]


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_order_is_the_distributed_samplers_own(rank):
    """Under DDP Lightning wraps the resumable sampler in a DistributedSampler; the records a
    rank's next batches draw are read off that very sampler, equal to iterating it."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
    from torch.utils.data import DataLoader

    src = ShapesSource(WorldConfig(), seed=0, sizes={"train": 11, "val": 2, "test": 2, "probe": 2})
    dm = PreferenceDataModule(
        src,
        src.captions("train"),
        batch_size=2,
        seed=3,
        negatives=NegativeConfig(kind="on_policy", dataset_fraction=0.0),
    )
    loader = dm.train_dataloader()
    sampler = _get_distributed_sampler(
        loader, shuffle=True, overfit_batches=0, num_replicas=2, rank=rank
    )
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        drawn = [
            i
            for b in DataLoader(range(11), batch_size=2, sampler=sampler, drop_last=True)
            for i in b.tolist()
        ]
        trainer = SimpleNamespace(
            train_dataloader=SimpleNamespace(sampler=sampler),
            current_epoch=epoch,
            num_training_batches=len(drawn) // 2,
            fit_loop=SimpleNamespace(
                epoch_loop=SimpleNamespace(
                    batch_progress=SimpleNamespace(
                        current=SimpleNamespace(ready=1), is_last_batch=False
                    )
                )
            ),
        )
        assert dm.upcoming_indices(trainer, 2) == list(dict.fromkeys(drawn[2:6]))


DDP_SCRIPT = """
import json, sys
from functools import partial

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from cwdpo.callbacks.on_policy import OnPolicyNegatives
from cwdpo.data.datamodules import NegativeConfig, PreferenceDataModule
from cwdpo.data.shapes import WorldConfig
from cwdpo.data.sources import ShapesSource
from cwdpo.model.backbone import VLMBackbone
from cwdpo.stages import CWDPOModule

tiny, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
L.seed_everything(0)
bb = VLMBackbone.from_pretrained(tiny, max_length=128)
bb.snapshot_reference()
src = ShapesSource(WorldConfig(), seed=0, sizes={"train": 30, "val": 2, "test": 2, "probe": 2})
neg = NegativeConfig(kind="on_policy", dataset_fraction=0.0, refresh_every_n_steps=2)
dm = PreferenceDataModule(src, src.captions("train"), batch_size=2, seed=0, negatives=neg,
                          collate=bb.collate, collate_pairs=bb.collate_pairs)
trained, calls = [], []
transfer = dm.on_before_batch_transfer


def spy(batch, i):
    b = transfer(batch, i)
    if dm._training():
        trained.append(b.image_ids)
    return b


def sampler(records, prompt, n):
    calls.append([r.image_id for r in records])
    return [[f"a purple star on the top {len(calls)} {i} {k}" for k in range(n.num_samples)]
            for i in range(len(records))]


dm.on_before_batch_transfer = spy
module = CWDPOModule(bb, optimizer=partial(torch.optim.SGD, lr=1e-4), total_steps=5)
trainer = L.Trainer(
    accelerator="cpu", devices=2, max_steps=5, logger=False, enable_checkpointing=False,
    strategy=DDPStrategy(process_group_backend="gloo", find_unused_parameters=True),
    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    num_sanity_val_steps=0, callbacks=[OnPolicyNegatives(2, sampler=sampler)])
trainer.fit(module, datamodule=dm)
with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
    json.dump({"calls": calls, "trained": trained, "fallback": dm.stats.on_policy_fallback,
               "buffer": sorted(dm.buffer)}, f)
"""


@pytest.mark.dist
def test_each_ddp_rank_samples_what_it_trains_on(tiny_vlm_path, tmp_path):
    """A real 2-process DDP stage (gloo): each rank samples exactly the records its own next
    batches draw (2 steps × batch 2 per refresh), no pair falls back to a dataset negative, and
    after the merge every rank holds both ranks' window (so rank 0's checkpoint has it all)."""
    from tests.test_ddp import launch

    script = tmp_path / "ddp_on_policy.py"
    script.write_text(DDP_SCRIPT)
    launch([str(script), str(tiny_vlm_path), str(tmp_path)], cwd=tmp_path, timeout=600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert [len(c) for c in r["calls"]] == [4, 4, 2]
        windows = [r["trained"][0:2], r["trained"][2:4], r["trained"][4:5]]
        assert [sorted(c) for c in r["calls"]] == [sorted(set(sum(w, []))) for w in windows]
        assert r["fallback"] == 0
    assert set(ranks[0]["calls"][0]).isdisjoint(ranks[1]["calls"][0])  # shards, not copies
    assert ranks[0]["buffer"] == ranks[1]["buffer"]
    assert ranks[0]["buffer"] == sorted(set(ranks[0]["calls"][2] + ranks[1]["calls"][2]))
