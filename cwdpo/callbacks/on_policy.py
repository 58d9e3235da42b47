"""On-policy negatives: sample the current policy on a step schedule and hand the samples to
the data module (`PreferenceDataModule.set_negatives`), which judges and buffers them.

A refresh samples exactly the records the next `every_n_steps` optimizer steps draw (the data
module reads them off its resumable sampler), so its cost is refresh_every_n_steps × batch × K
captions whatever the dataset size (`every_n_steps=1`: fully on-policy, per batch). Each rank
samples what it will train on; the samples are then merged so that every rank (and so rank 0's
checkpoint) holds the whole window.

The model runs here, not in the data module, behind one seam: a `CaptionSampler` maps
(records, prompt, sampling settings) to K captions per record. `policy_sampler` wraps the
backbone's `generate` (image + prompt prefilled once per record, K continuations from the
expanded cache); a GPU run can pass `OnPolicyNegatives(sampler=...)` an external engine (e.g. a
vLLM server holding a copy of the policy, synced at each refresh) without touching the schedule,
the buffer, resume or the counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import lightning as L
import torch

from cwdpo.data.datamodules import PreferenceDataModule
from cwdpo.data.negative_config import NegativeConfig
from cwdpo.data.records import CaptionRecord, load_images, record_prompt
from cwdpo.utils.dist import rank_world

Generate = Callable[..., list[str]]  # `VLMBackbone.generate(images, prompts, **sampling)`


class CaptionSampler(Protocol):
    """K = `neg.num_samples` sampled captions per record, in record order."""

    def __call__(
        self, records: Sequence[CaptionRecord], prompt: str, neg: NegativeConfig
    ) -> list[list[str]]: ...


@torch.no_grad()
def sample_captions(
    generate: Generate, records: Sequence[CaptionRecord], prompt: str, neg: NegativeConfig
) -> list[list[str]]:
    """`neg.num_samples` sampled captions per record (in record order),
    `neg.generation_batch_size` images at a time; with `neg.greedy_candidate` the record's
    greedy caption comes first."""
    n, bs = neg.num_samples, neg.generation_batch_size
    out: list[list[str]] = []
    for s in range(0, len(records), bs):
        chunk = records[s : s + bs]
        images = [load_images(r) for r in chunk]
        prompts = [record_prompt(r, prompt) for r in chunk]
        texts = generate(
            images,
            prompts,
            max_new_tokens=neg.max_new_tokens,
            do_sample=True,
            temperature=neg.temperature,
            top_p=neg.top_p,
            num_return_sequences=n,
        )
        greedy: list[list[str]] = [[] for _ in chunk]
        if neg.greedy_candidate:
            greedy = [[t] for t in generate(images, prompts, max_new_tokens=neg.max_new_tokens)]
        out.extend(greedy[j] + list(texts[j * n : (j + 1) * n]) for j in range(len(chunk)))
    return out


def policy_sampler(generate: Generate) -> CaptionSampler:
    """The default `CaptionSampler`: the policy's own batched `generate`."""

    def sample(
        records: Sequence[CaptionRecord], prompt: str, neg: NegativeConfig
    ) -> list[list[str]]:
        return sample_captions(generate, records, prompt, neg)

    return sample


def refresh_negatives(
    dm: PreferenceDataModule,
    sampler: CaptionSampler,
    step: int,
    indices: Sequence[int] | None = None,
) -> dict[str, float]:
    """Sample the records `indices` (into `dm.train_records`: this rank's next batches; None:
    every training record, split across ranks), merge every rank's samples (rank 0's first)
    and give them to `dm.set_negatives`; returns the counts and timings to log.

    The samples go by record, not by image id: a pair file can hold several records of one
    image, and each record's samples are judged against that record."""
    rank, world = rank_world()
    mine = list(range(len(dm.train_records)))[rank::world] if indices is None else list(indices)
    t0 = time.perf_counter()
    texts = sampler([dm.train_records[i] for i in mine], dm.source.prompt, dm.neg)
    seconds = time.perf_counter() - t0
    samples = list(zip(mine, texts))
    if world > 1:  # every rank holds the whole window, so rank 0's checkpoint has it all
        import torch.distributed as dist

        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, samples)
        samples = [entry for part in parts for entry in part]
    stats = dm.set_negatives(samples, step)
    st = dm.stats
    st.sampled_records += len(mine)
    st.samples += sum(len(t) for t in texts)
    st.sample_seconds += seconds
    return {
        **stats,
        "on_policy/sampled_records": float(len(mine)),
        "on_policy/sample_seconds": seconds,
    }


class OnPolicyNegatives(L.Callback):
    """Every `every_n_steps` optimizer steps (and before the first), resample the on-policy
    negatives of the records the next `every_n_steps` steps draw, with the policy being
    trained (or `sampler`, the seam for an external engine)."""

    def __init__(self, every_n_steps: int = 50, sampler: CaptionSampler | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"negatives.refresh_every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.sampler = sampler
        self.last_refresh: int | None = None
        self.pending: dict[str, float] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed single-process run keeps its restored buffer: it holds exactly the window
        # the interrupted run sampled. Under DDP the resumed epoch restarts, so resample.
        if self.last_refresh is None or trainer.world_size > 1:
            self.refresh(trainer, pl_module)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        dm = trainer.datamodule
        pending = {**self.pending, "negatives/samples_per_pair": dm.stats.samples_per_pair()}
        for k, v in pending.items():
            pl_module.log(k, v, on_step=True, on_epoch=False, batch_size=1)
        self.pending = {}
        step = trainer.global_step
        if (
            step % self.every_n_steps == 0
            and step != self.last_refresh
            and step < trainer.max_steps
        ):
            self.refresh(trainer, pl_module)

    def window_batches(self, trainer: L.Trainer) -> int:
        """Batches (this rank's) until the next scheduled refresh, at most to the stage end."""
        steps = self.every_n_steps
        if trainer.max_steps is not None and trainer.max_steps > 0:
            steps = max(1, min(steps, trainer.max_steps - trainer.global_step))
        return steps * max(1, int(trainer.accumulate_grad_batches))

    def refresh(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Resample now (the schedule, and the probe callback's `refresh` rules, call this)."""
        step = trainer.global_step
        dm = trainer.datamodule
        indices = dm.upcoming_indices(trainer, self.window_batches(trainer))
        sampler = self.sampler or policy_sampler(pl_module.backbone.generate)
        stats = refresh_negatives(dm, sampler, step, indices)
        self.last_refresh = step
        self.pending = stats  # logged at the next batch end (logging is not allowed in every hook)

    def state_dict(self) -> dict[str, Any]:
        return {"last_refresh": self.last_refresh}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_refresh = state_dict.get("last_refresh")
