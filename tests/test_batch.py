"""The typed batches: Lightning moves their tensors (dataclass fields) and leaves the rest."""

from __future__ import annotations

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from cwdpo.batch import CaptionBatch, PairBatch


def test_lightning_moves_dataclass_batches_field_by_field():
    ids = torch.ones(4, 3, dtype=torch.long)
    pair = PairBatch(
        inputs={"input_ids": ids, "labels": ids},
        n=2,
        chosen=["a", "b"],
        rejected=["c", "d"],
        image_ids=["0", "1"],
        sources=["easy:other_image", "on_policy"],
        neg_is_dataset=torch.tensor([1.0, 0.0]),
        neg_is_easy=torch.tensor([1.0, 0.0]),
    )
    moved = move_data_to_device(pair, torch.device("meta"))  # what Trainer.fit does per batch
    assert isinstance(moved, PairBatch) and moved is not pair
    assert moved.inputs["input_ids"].is_meta and moved.neg_is_easy.is_meta
    assert (moved.n, moved.chosen, moved.rejected) == (2, ["a", "b"], ["c", "d"])
    assert moved.sources == pair.sources and moved.image_ids == pair.image_ids
    assert not pair.inputs["input_ids"].is_meta  # the original is left alone
    bare = move_data_to_device(PairBatch({"input_ids": ids}, 2), torch.device("meta"))
    assert bare.neg_is_dataset is None and bare.sources == []
    one = move_data_to_device(CaptionBatch({"input_ids": ids}, 4), torch.device("meta"))
    assert isinstance(one, CaptionBatch) and one.inputs["input_ids"].is_meta and one.n == 4
