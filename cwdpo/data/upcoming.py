"""Which records the next training batches draw, read off the sampler without advancing it.

Why: an on-policy refresh should sample what the next steps train on, not the dataset (a
refresh over COCO's 28k stage-2 images to serve 400 pairs is hours of generation with a 7B
model). The order is the resumable sampler's own (`ResumableSampler.permutation`), sharded by
the `DistributedSampler` Lightning wraps it in under DDP; the position is Lightning's batch
progress (the loader prefetches, so the sampler itself runs ahead of training).
"""

from __future__ import annotations

import copy
from typing import Any

from torch.utils.data import DistributedSampler

from cwdpo.data.sampler import ResumableSampler


def upcoming_indices(
    sampler: ResumableSampler, batch_size: int, n_records: int, trainer: Any, n_batches: int
) -> list[int]:
    """Record indices of the next `n_batches` batches this rank draws, in order, each once
    (a window longer than an epoch wraps into the next epochs' orders)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    epoch, batch = int(trainer.current_epoch), int(progress.current.ready)
    if progress.is_last_batch:
        epoch, batch = epoch + 1, 0
    per_epoch = trainer.num_training_batches
    if not isinstance(per_epoch, int) or per_epoch < 1:  # unknown length: every record
        return list(range(n_records))
    out: list[int] = []
    while n_batches > 0 and len(out) < n_records * 2:
        order = rank_order(sampler, trainer, epoch)
        take = min(n_batches, per_epoch - batch)
        out.extend(order[batch * batch_size : (batch + take) * batch_size])
        n_batches, epoch, batch = n_batches - take, epoch + 1, 0
    return list(dict.fromkeys(out))


def rank_order(sampler: ResumableSampler, trainer: Any, epoch: int) -> list[int]:
    """The record indices this rank draws in `epoch`, in order."""
    perm = sampler.permutation(epoch)
    loader = getattr(trainer, "train_dataloader", None)
    wrapper = getattr(loader, "sampler", None)
    if not isinstance(wrapper, DistributedSampler):
        return perm
    shard = copy.copy(wrapper)  # DistributedSampler's own sharding at `epoch`, unadvanced
    shard.epoch = epoch
    return [perm[p] for p in DistributedSampler.__iter__(shard)]
