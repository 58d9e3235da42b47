"""On-policy negatives: sample the current policy on a step schedule and hand the samples to
the data module (`PreferenceDataModule.set_negatives`), which judges and buffers them.

The model runs here, not in the data module: each rank samples its shard of the training
images, then the shards are merged so every rank holds every image's samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch

from cwdpo.data.datamodules import PreferenceDataModule
from cwdpo.data.negative_config import NegativeConfig
from cwdpo.data.records import CaptionRecord, load_images, record_prompt
from cwdpo.utils.dist import rank_world

Generate = Callable[..., list[str]]  # `VLMBackbone.generate(images, prompts, **sampling)`


@torch.no_grad()
def sample_captions(
    generate: Generate, records: Sequence[CaptionRecord], prompt: str, neg: NegativeConfig
) -> list[list[str]]:
    """`neg.num_samples` sampled captions per record (in record order),
    `neg.generation_batch_size` images at a time."""
    n, bs = neg.num_samples, neg.generation_batch_size
    out: list[list[str]] = []
    for s in range(0, len(records), bs):
        chunk = records[s : s + bs]
        texts = generate(
            [load_images(r) for r in chunk],
            [record_prompt(r, prompt) for r in chunk],
            max_new_tokens=neg.max_new_tokens,
            do_sample=True,
            temperature=neg.temperature,
            top_p=neg.top_p,
            num_return_sequences=n,
        )
        out.extend(list(texts[j * n : (j + 1) * n]) for j in range(len(chunk)))
    return out


def refresh_negatives(dm: PreferenceDataModule, generate: Generate, step: int) -> dict[str, float]:
    """Sample every training record of `dm`, each rank its own shard, merge the shards across
    ranks (rank 0's first) and give them to `dm.set_negatives`; returns its counts (to log).

    The samples go by record (index into `dm.train_records`), not by image id: a pair file can
    hold several records of one image, and each record's samples are judged against that
    record, and counted, as before the sampling moved here."""
    rank, world = rank_world()
    mine = list(range(len(dm.train_records)))[rank::world]
    texts = sample_captions(generate, [dm.train_records[i] for i in mine], dm.source.prompt, dm.neg)
    samples = list(zip(mine, texts))
    if world > 1:  # every rank needs every record's samples: merge the shards
        import torch.distributed as dist

        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, samples)
        samples = [entry for part in parts for entry in part]
    return dm.set_negatives(samples, step)


class OnPolicyNegatives(L.Callback):
    """Every `every_n_steps` optimizer steps (and before the first), resample the datamodule's
    on-policy negatives with the policy being trained."""

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"negatives.refresh_every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.last_refresh: int | None = None
        self.pending: dict[str, float] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.last_refresh is None:  # a resumed run keeps its restored buffer
            self.refresh(trainer, pl_module)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        for k, v in self.pending.items():
            pl_module.log(k, v, on_step=True, on_epoch=False, batch_size=1)
        self.pending = {}
        step = trainer.global_step
        if (
            step % self.every_n_steps == 0
            and step != self.last_refresh
            and step < trainer.max_steps
        ):
            self.refresh(trainer, pl_module)

    def refresh(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Resample now (the schedule, and the probe callback's `refresh` rules, call this)."""
        step = trainer.global_step
        stats = refresh_negatives(trainer.datamodule, pl_module.backbone.generate, step)
        self.last_refresh = step
        self.pending = stats  # logged at the next batch end (logging is not allowed in every hook)

    def state_dict(self) -> dict[str, Any]:
        return {"last_refresh": self.last_refresh}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_refresh = state_dict.get("last_refresh")
