"""The training shuffle order, restartable mid-epoch: what makes a resumed run see the very
batches an uninterrupted run sees.

- `ResumableSampler`: the order of epoch e depends only on (seed, e), and an iteration can
  start after the first k batches of an epoch.
- `train_position`: where training is in that order, for the data module's checkpoint state.

Why in the data layer: the data modules own the train loader and save/restore its position
(`datamodules.py`), and the on-policy window reads the same order (`upcoming.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """A seeded permutation per epoch, that can start after the first k batches of an epoch.

    Epoch e's order is a function of (seed, e) only (no generator state carried across
    epochs), so a run resumed at (epoch e, batch k) continues exactly where an uninterrupted
    run would be. Lightning calls `set_epoch` before every epoch but the first of a `fit`.
    """

    def __init__(self, n: int, seed: int, batch_size: int) -> None:
        self.n, self.seed, self.batch_size = n, int(seed), batch_size
        self.epoch = 0
        self._skip = 0

    def permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**62))
        return torch.randperm(self.n, generator=g).tolist()

    def start_at(self, epoch: int, batches: int) -> None:
        """The next iteration is epoch `epoch`, minus its first `batches` batches."""
        self.epoch, self._skip = int(epoch), int(batches) * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._skip = int(epoch), 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        perm = self.permutation(self.epoch)
        skip, self._skip = self._skip, 0
        yield from perm[skip:]


def train_position(sampler: ResumableSampler | None, trainer: Any) -> dict[str, int] | None:
    """(epoch, batches consumed by training in it) for a checkpoint taken now.

    Read from Lightning's batch progress, not from the sampler: the loader prefetches, so the
    sampler is ahead of what training has consumed. A checkpoint on an epoch's last batch
    resumes at the start of the next epoch (as Lightning's loops do). Single-process only: under
    DDP the epoch restarts (Lightning's default), so resume is not bitwise there.
    """
    if sampler is None or trainer is None or getattr(trainer, "world_size", 1) > 1:
        return None  # multi-process: Lightning wraps the sampler in a distributed one
    progress = trainer.fit_loop.epoch_loop.batch_progress
    if progress.is_last_batch:
        return {"epoch": sampler.epoch + 1, "batches": 0}
    return {"epoch": sampler.epoch, "batches": int(progress.current.ready)}
