"""LightningDataModules: records → (positives, negatives) → collated batches.

Images load in DataLoader workers (bounded pool); negatives are chosen and batches are
collated in `on_before_batch_transfer`, i.e. in the main process, because on-policy
negatives live in a buffer that the refresh callback (`cwdpo.callbacks.on_policy`) fills
during training: the callback samples the policy, the data module only receives the samples
(`PreferenceDataModule.set_negatives`). Batches are `cwdpo.batch.CaptionBatch` / `PairBatch`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from cwdpo.batch import CaptionBatch, ModelInputs, PairBatch, negative_flags
from cwdpo.data.negative_config import NegativeConfig, NegativeStats
from cwdpo.data.records import CaptionRecord, DataError, load_images, record_prompt
from cwdpo.data.sampler import ResumableSampler, train_position
from cwdpo.data.self_judged import check_pair_rule, judge_samples
from cwdpo.data.sources import CaptionSource, draw_negative
from cwdpo.data.upcoming import upcoming_indices
from cwdpo.errors import OverBudget
from cwdpo.utils.dist import rank_world

#: `VLMBackbone.collate(images, prompts, responses)` / `collate_pairs(images, prompts, chosen,
#: rejected)`: texts → `ModelInputs`
Collate = Callable[..., ModelInputs]


class _Indexed(Dataset):
    """Yields (index, loaded image(s)): the only per-item work worth a worker process."""

    def __init__(self, records: Sequence[CaptionRecord]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, load_images(self.records[i])


def _as_lists(items: list[tuple[int, Any]]) -> tuple[list[int], list[Any]]:
    return [i for i, _ in items], [im for _, im in items]


def split_records(records: list[CaptionRecord], fractions: dict[str, float]) -> dict[str, list]:
    """Contiguous split of train records between stages (the paper's 75% / 25%)."""
    total = sum(fractions.values())
    if total <= 0:
        raise DataError(f"data.stage_split fractions must sum to > 0, got {fractions}")
    out, start = {}, 0
    for k, f in fractions.items():
        n = round(len(records) * f / total)
        out[k] = records[start : start + n]
        start += n
    return out


class _Base(L.LightningDataModule):
    """`collate` / `collate_pairs` turn texts into model inputs (the backbone's methods of the
    same names); a module built without them serves its loaders but no batches."""

    def __init__(
        self,
        source: CaptionSource,
        train_records: Sequence[CaptionRecord],
        val_records: Sequence[CaptionRecord] = (),
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        collate: Collate | None = None,
        collate_pairs: Collate | None = None,
    ) -> None:
        super().__init__()
        if not train_records:
            raise DataError("the training split for this stage has no rows")
        self.source = source
        self.train_records = list(train_records)
        self.val_records = list(val_records)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.collate, self.collate_pairs = collate, collate_pairs
        self.rng = random.Random(seed)
        self.records_by_loader: dict[str, list[CaptionRecord]] = {}
        self.negative_sources: Counter = Counter()  # stage 1 gentle negatives, by source
        self._evaluating = False
        self.train_sampler: ResumableSampler | None = None  # resumable shuffle (see state_dict)
        self._resume_position: dict[str, int] | None = None
        self.dropped_over_budget = 0  # rows dropped at collate time (model.truncation=drop_pair)

    def _fitting(self, collate: Collate, *columns: list) -> tuple[ModelInputs, list[list]]:
        """(inputs, columns) without the rows `OverBudget` names (truncation=drop_pair), counted."""
        try:
            return collate(*columns), list(columns)
        except OverBudget as e:
            keep = [i for i in range(len(columns[0])) if i not in set(e.rows)]
            if not keep:
                raise OverBudget(f"{e}; every row of the batch is over budget", e.rows) from None
            self.dropped_over_budget += len(columns[0]) - len(keep)
            return collate(*(kept := [[c[i] for i in keep] for c in columns])), kept

    def setup(self, stage: str | None = None) -> None:
        rank, world = rank_world()
        if world > 1:  # decorrelate negative draws across ranks (single process: unchanged)
            self.rng = random.Random(self.seed * 1_000_003 + rank)

    def _loader(self, records: list[CaptionRecord], shuffle: bool) -> DataLoader:
        # The order comes from ResumableSampler (seeded per epoch, restartable mid-epoch); the
        # generator only seeds worker base seeds, so loaders never draw from the global RNG.
        g = torch.Generator().manual_seed(self.seed)
        sampler = None
        if shuffle:
            sampler = ResumableSampler(len(records), self.seed, self.batch_size)
            if self._resume_position:
                sampler.start_at(**self._resume_position)
                self._resume_position = None
            self.train_sampler = sampler
        return DataLoader(
            _Indexed(records),
            batch_size=self.batch_size,
            sampler=sampler,
            generator=g,
            num_workers=self.num_workers,
            collate_fn=_as_lists,
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle and len(records) >= self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_records, shuffle=True)

    def upcoming_indices(self, trainer: Any, n_batches: int) -> list[int]:
        """Indices into `train_records` of the next `n_batches` training batches this rank
        draws (`cwdpo.data.upcoming`): what an on-policy refresh samples."""
        if self.train_sampler is None:
            raise RuntimeError("upcoming_indices needs the training loader (train_dataloader())")
        return upcoming_indices(
            self.train_sampler, self.batch_size, len(self.train_records), trainer, n_batches
        )

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_records, shuffle=False) if self.val_records else []

    def _training(self) -> bool:
        if self._evaluating:
            return False
        trainer = getattr(self, "trainer", None)
        return trainer is None or trainer.training

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Draw validation batches outside `Trainer.fit` (fixed negatives, no stats/RNG use)."""
        self._evaluating = True
        try:
            yield
        finally:
            self._evaluating = False

    def _records(self) -> list[CaptionRecord]:
        return self.train_records if self._training() else self.val_records

    def _batch_rng(self, idx: list[int]) -> random.Random:
        """Training draws advance the (checkpointed) RNG; validation draws are fixed per batch,
        so val/loss compares like with like and validation never shifts the training stream."""
        if self._training():
            return self.rng
        return random.Random(
            self.seed * 7919 + 104_729 + sum((i + 1) * 31**k for k, i in enumerate(idx))
        )

    def _unpack(
        self, batch: Any
    ) -> tuple[list[CaptionRecord], list[Any], list[str], list[str], random.Random]:
        """(records, images, prompts, one positive per record, the batch's RNG)."""
        if self.collate is None or self.collate_pairs is None:
            raise RuntimeError(
                f"{type(self).__name__} was built without collate functions: pass "
                "collate=backbone.collate, collate_pairs=backbone.collate_pairs"
            )
        idx, images = batch
        recs = self._records()
        rows = [recs[i] for i in idx]
        rng = self._batch_rng(idx)
        prompts = [record_prompt(r, self.source.prompt) for r in rows]
        return rows, images, prompts, [rng.choice(r.references) for r in rows], rng

    def _gentle_negative(
        self, rec: CaptionRecord, rng: random.Random, chosen: str | None = None
    ) -> tuple[str, str]:
        """A hard (one-fact-off) negative that is not a positive; sources are counted."""
        got = draw_negative(self.source, rec, rng, hard=True, chosen=chosen)
        if got is not None:
            if self._training():
                self.negative_sources[got[1]] += 1
            return got
        raise DataError(
            f"could not draw a gentle negative for image {rec.image_id} that is not "
            "a positive (does the record have a rejected text equal to a reference?)"
        )

    def _pair_batch(
        self,
        rows: list[CaptionRecord],
        images: list[Any],
        prompts: list[str],
        chosen: list[str],
        negs: list[tuple[str, str]],
    ) -> PairBatch:
        """Collate (chosen, rejected) pairs; `negs` holds each pair's (rejected, source)."""
        rejected = [t for t, _ in negs]
        inputs, (images, prompts, chosen, rejected, rows, negs) = self._fitting(
            lambda *c: self.collate_pairs(*c[:4]), images, prompts, chosen, rejected, rows, negs
        )
        sources = [s for _, s in negs]
        neg_is_dataset, neg_is_easy = negative_flags(sources)
        return PairBatch(
            inputs=inputs,
            n=len(rows),
            chosen=list(chosen),
            rejected=rejected,
            image_ids=[r.image_id for r in rows],
            sources=sources,
            neg_is_dataset=neg_is_dataset,
            neg_is_easy=neg_is_easy,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.getstate(),
            "train_position": train_position(self.train_sampler, getattr(self, "trainer", None)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng" in state:
            st = state["rng"]
            self.rng.setstate((st[0], tuple(st[1]), st[2]))
        self._resume_position = state.get("train_position")


class CaptionDataModule(_Base):
    """Base SFT and Stage 1 (SFT-C): positives, plus one gentle negative per image if asked."""

    def __init__(self, *args: Any, gentle_negatives: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gentle_negatives = gentle_negatives

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> CaptionBatch | PairBatch:
        rows, images, prompts, pos, rng = self._unpack(batch)
        if not self.gentle_negatives:
            inputs, kept = self._fitting(lambda *c: self.collate(*c[:3]), images, prompts, pos)
            return CaptionBatch(inputs=inputs, n=len(kept[0]))
        negs = [self._gentle_negative(r, rng, p) for r, p in zip(rows, pos)]
        return self._pair_batch(rows, images, prompts, pos, negs)


class PreferenceDataModule(_Base):
    """Stage 2 (CW-DPO): (chosen, rejected) pairs with dataset, on-policy or mixed negatives.

    Each pair draws its negative from the dataset with probability `dataset_fraction`, else
    from the on-policy buffer, so the fraction holds in expectation; the realised fraction is
    in every batch (`neg_is_dataset`) for logging. On-policy samples that the source judges
    to be positives are never used as negatives.
    """

    def __init__(
        self, *args: Any, negatives: NegativeConfig | dict | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        # a dict: the `negatives` config group, as `stage.cw_dpo.datamodule.negatives` gives it
        self.neg = NegativeConfig(**negatives) if isinstance(negatives, dict) else negatives
        self.neg = self.neg or NegativeConfig()
        self.buffer: dict[str, list[str]] = {}  # self_judged: [best, worst] or [best] (no gap)
        self.pair_source: dict[str, str] = {}  # self_judged: image id → how its pair was made
        self.stats = NegativeStats()
        self.self_judged = self.neg.kind == "self_judged"
        check_pair_rule(self.source, self.neg)

    @property
    def needs_on_policy(self) -> bool:
        return self.neg.dataset_fraction < 1.0

    def set_negatives(
        self, samples: Sequence[tuple[int, Sequence[str]]], step: int
    ) -> dict[str, float]:
        """Take fresh policy samples (index into `train_records`, that record's captions; every
        rank's, merged) as the buffer, dropping the previous one. Each record's samples are
        judged against it: positives are dropped; self_judged keeps its pair (`judge_samples`).
        An image with several records keeps its last one's. Returns the counts to log."""
        buffer: dict[str, list[str]] = {}
        self.pair_source = {}
        kept = dropped = edits = 0
        for index, texts in samples:
            rec = self.train_records[index]
            image_id, texts = rec.image_id, [t for t in texts if t.strip()]
            if self.self_judged:
                buffer[image_id], src = judge_samples(self.source, self.neg, texts, rec)
                self.pair_source.pop(image_id, None)  # an earlier record's edit label
                if src != "self:worst":
                    self.pair_source[image_id], edits = src, edits + 1
                kept += len(buffer[image_id]) == 2
                dropped += len(buffer[image_id]) < 2
                continue
            good = [t for t in texts if not self.source.is_positive(t, rec)]
            dropped += len(texts) - len(good)
            kept += len(good)
            buffer[image_id] = good
        self.buffer = buffer
        self.stats.refresh_steps.append(step)
        if self.self_judged:
            out = {"self_judged/pairs": float(kept), "self_judged/no_gap": float(dropped)}
            if self.neg.pair_rule == "companion_edit":
                out["self_judged/companion_edits"] = float(edits)
            return out
        self.stats.rejected_as_positive += dropped
        return {"on_policy/kept": float(kept), "on_policy/dropped_as_positive": float(dropped)}

    def _self_pair(self, rec: CaptionRecord, ref: str, rng: random.Random) -> tuple[str, str, str]:
        """(chosen, rejected, source) of a self-judged pair; held-out rows use the reference."""
        own = self.buffer.get(rec.image_id, []) if self._training() else []
        if len(own) == 2:
            src = self.pair_source.get(rec.image_id, "self:worst")
            chosen, (rejected, src) = own[0], (own[1], src)
        else:
            chosen = own[0] if own else ref
            rejected, src = self._gentle_negative(rec, rng, chosen)  # a one-fact edit of it
            src = f"self:minimal:{src}"
        if self.neg.easy_mix > 0 and rng.random() < self.neg.easy_mix:
            easy = draw_negative(
                self.source,
                rec,
                rng,
                hard=False,
                chosen=chosen,
                accept=lambda t: t != chosen and not self.source.is_positive(t, rec),
            )
            if easy is not None:
                return chosen, *easy
        return chosen, rejected, src

    def _negative(self, rec: CaptionRecord, chosen: str, rng: random.Random) -> tuple[str, str]:
        if rng.random() >= self.neg.dataset_fraction:
            pool = [t for t in self.buffer.get(rec.image_id, []) if t != chosen]
            if pool:
                return rng.choice(pool), "on_policy"
            if self._training():
                self.stats.on_policy_fallback += 1
        got = draw_negative(
            self.source,
            rec,
            rng,
            hard=lambda: rng.random() >= self.neg.easy_fraction,
            chosen=chosen,
        )
        if got is not None:
            return got
        raise DataError(
            f"could not draw a negative for image {rec.image_id} that is not a positive"
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> PairBatch:
        rows, images, prompts, chosen, rng = self._unpack(batch)
        if self.self_judged:
            trip = [self._self_pair(r, c, rng) for r, c in zip(rows, chosen)]
            chosen, negs = [t[0] for t in trip], [(t[1], t[2]) for t in trip]
        else:
            negs = [self._negative(r, c, rng) for r, c in zip(rows, chosen)]
        batch = self._pair_batch(rows, images, prompts, chosen, negs)
        if self._training():  # what trains: pairs `truncation=drop_pair` dropped are not counted
            self.stats.pairs += batch.n
            for src in batch.sources:
                self.stats.counts[src] += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "buffer": self.buffer,
            "pair_source": self.pair_source,
            "stats": self.stats.to_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "stats" in state:
            self.stats = NegativeStats.from_state(state["stats"])
        self.buffer = dict(state.get("buffer", {}))
        self.pair_source = dict(state.get("pair_source", {}))
