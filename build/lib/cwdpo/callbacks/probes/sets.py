"""Probe-set construction: fixed records, per-group texts, pre-collated batches.

The dataset groups are drawn with a (seed, group) RNG, so every stage (and every run with
that seed) probes the very same texts; the on-policy group is one sample per probe image from
the stage-start policy, seeded without touching the training RNG, then frozen.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cwdpo.callbacks.probes.config import ProbeConfig
from cwdpo.data.records import load_images, record_prompt
from cwdpo.data.sources import draw_negative
from cwdpo.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class ProbeSet:
    """One fixed group: texts, their image ids and the pre-collated batches."""

    group: str
    image_ids: list[str]
    texts: list[str]
    batches: list[dict[str, torch.Tensor]] = field(default_factory=list, repr=False)

    @property
    def key(self) -> str:
        """Content hash: a run-wide baseline is only reused for the very same texts."""
        h = hashlib.sha1()
        for i, t in zip(self.image_ids, self.texts):
            h.update(f"{i}\t{t}\n".encode())
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.texts)


def probe_records(source: Any, split: str = "probe", fallback: str = "val", n: int = 64) -> list:
    """The first `n` records of the probe split (or of `fallback` if the source has none)."""
    try:
        recs = source.captions(split)
    except Exception as e:  # sources raise DataError for unknown / empty splits
        log.warning("probe split %r unavailable (%s); probing on %r", split, e, fallback)
        recs = source.captions(fallback)
    return list(recs)[:n]


def probe_texts(
    source: Any, records: Sequence[Any], group: str, seed: int
) -> list[tuple[int, str]]:
    """(record index, text) for a dataset group, drawn with a per-group seeded RNG.

    The RNG is seeded by (seed, group) so every stage (and every run with that seed) probes
    the very same texts, and adding a group does not change the others.
    """
    rng = random.Random(f"{seed}-{group}")
    out = []
    for i, rec in enumerate(records):
        if group == "positives":
            out.append((i, rng.choice(rec.references)))
            continue
        got = draw_negative(
            source,
            rec,
            rng,
            hard=group == "gentle",
            accept=lambda t, rec=rec: (
                bool(t.strip()) and t not in rec.references and not source.is_positive(t, rec)
            ),
        )
        if got is not None:
            out.append((i, got[0]))
    return out


def collate_set(
    group: str, backbone: Any, source: Any, records: Sequence[Any], rows: Sequence[Any], bs: int
) -> ProbeSet:
    """The group's texts in `bs`-sized batches, each image loaded once. A text that does not fit
    model.max_length is left out (logged), never measured cut: probes never stop training."""
    images: dict[int, Any] = {}

    def collate(chunk: Sequence[Any]) -> dict[str, torch.Tensor]:
        for i, _ in chunk:
            if i not in images:
                images[i] = load_images(records[i])
        ims = [images[i] for i, _ in chunk]
        prompts = [record_prompt(records[i], source.prompt) for i, _ in chunk]
        return backbone.collate(ims, prompts, [t for _, t in chunk])

    kept, batches = [], []
    for s in range(0, len(rows), bs):
        chunk = list(rows[s : s + bs])
        try:
            batches.append(collate(chunk))
        except DataError as e:  # over model.max_length (cwdpo.model.truncation)
            fit = [r for r in chunk if _fits(collate, r)]
            log.warning("probes: %s: %d text(s) left out: %s", group, len(chunk) - len(fit), e)
            chunk = fit
            batches += [collate(chunk)] if chunk else []
        kept += chunk
    ps = ProbeSet(group, [records[i].image_id for i, _ in kept], [t for _, t in kept])
    ps.batches = batches
    return ps


def _fits(collate: Any, row: Any) -> bool:
    try:
        collate([row])
    except DataError:
        return False
    return True


def on_policy_rows(
    cfg: ProbeConfig, backbone: Any, source: Any, records: Sequence[Any]
) -> list[tuple[int, str]]:
    """One sample per probe image from the stage-start policy, seeded and then frozen."""
    out: list[tuple[int, str]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for s in range(0, len(records), cfg.batch_size):
            chunk = records[s : s + cfg.batch_size]
            texts = backbone.generate(
                [load_images(r) for r in chunk],
                [record_prompt(r, source.prompt) for r in chunk],
                max_new_tokens=cfg.on_policy_max_new_tokens,
                do_sample=True,
                temperature=cfg.on_policy_temperature,
            )
            for j, (r, t) in enumerate(zip(chunk, texts)):
                if t.strip() and not source.is_positive(t, r):
                    out.append((s + j, t))
    return out


def build_probe_sets(
    cfg: ProbeConfig, datamodule: Any, backbone: Any, saved_on_policy: dict | None = None
) -> dict[str, ProbeSet]:
    """Every group's set for this stage. `saved_on_policy` (a resumed stage's checkpoint):
    the stage-start samples, not fresh ones from the resumed policy."""
    source = getattr(datamodule, "source", None)
    if source is None:
        log.warning("probes: the datamodule has no `source`; no probe sets")
        return {}
    records = probe_records(source, cfg.split, cfg.fallback_split, cfg.n_items)
    sets: dict[str, ProbeSet] = {}
    for group in cfg.groups:
        rows = probe_texts(source, records, group, cfg.seed)
        if rows:
            sets[group] = collate_set(group, backbone, source, records, rows, cfg.batch_size)
    if not cfg.wants_on_policy(datamodule):
        return sets
    if saved_on_policy:
        where = {r.image_id: i for i, r in enumerate(records)}
        ids, texts = saved_on_policy["image_ids"], saved_on_policy["texts"]
        rows = [(where[i], t) for i, t in zip(ids, texts) if i in where]
    else:
        rows = on_policy_rows(cfg, backbone, source, records)
    if rows:
        sets["on_policy"] = collate_set(
            "on_policy", backbone, source, records, rows, cfg.batch_size
        )
    else:
        log.info("probes: the policy produced no usable on-policy negatives")
    return sets
