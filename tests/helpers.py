"""Test helpers: compose the project's Hydra config (no CLI, output dir under tmp), a bare
CW-DPO module on literal log-probs, and offline caption preference pairs."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from cwdpo.run.config import CONFIG_DIR
from cwdpo.utils.overrides import plain_group_overrides


def compose_cfg(
    overrides: list[str], out_dir: Path, cache_dir: Path, name: str = "train"
) -> DictConfig:
    """The config `python -m cwdpo.<name> *overrides` composes (`+experiment=NAME` accepted,
    as the CLI accepts it)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            config_name=name,
            overrides=[
                f"paths.output_dir={out_dir}",
                f"paths.cache_dir={cache_dir}",
                *plain_group_overrides(overrides),
            ],
        )


def bare_cw_dpo_module(pair_logps, **knobs):
    """A `CWDPOModule` built by its own `__init__` without a backbone: `knobs` (objective
    fields or module arguments; defaults: CW-DPO at β=0.1) are checked as in a run, and
    `pair_logps` is replaced by `pair_logps(batch)`, so `compute` runs on literal log-probs."""
    from cwdpo.stages import CWDPOModule

    m = CWDPOModule(None, optimizer=None, **{"beta": 0.1, **knobs})
    m.pair_logps = pair_logps
    return m


def make_dataset_pairs(
    records, prompt, vocab=None, hard_fraction=0.5, rng_seed=0, *, per="reference", stats=None
):
    """Offline preference pairs (reference, dataset negative) for caption records; test-only
    (training draws its negatives through `cwdpo.data.sources`).

    `per="reference"`: one pair per (record, reference); `per="record"`: one pair per record
    with a reference drawn at random. Each pair is hard with probability `hard_fraction`
    (falling back to easy when no swap is possible, `meta["fallback"]`), else easy. `source`
    says which; hard pairs record the swap in `meta["perturbed"]` = {kind, from, to}, easy ones
    `meta["negative_image_id"]`. Deterministic for a given `rng_seed`. `vocab` defaults to one
    mined from `records`. Records without references are skipped (logged, counted).
    """
    import logging
    import random
    from collections import Counter

    from cwdpo.data.caption_negatives import CaptionVocab
    from cwdpo.data.reading import bump, report_skipped

    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
    if per not in ("reference", "record"):
        raise ValueError(f"per must be 'reference' or 'record', got {per!r}")
    records = list(records)
    vocab = CaptionVocab.mine(records) if vocab is None else vocab
    rng = random.Random(rng_seed)
    pool = [r for r in records if r.references]
    counts: Counter[str] = Counter()
    pairs = []
    for rec in records:
        if not rec.references:
            counts["no_references"] += 1
            continue
        if per == "reference":
            chosen = list(enumerate(rec.references))
        else:
            j = rng.randrange(len(rec.references))
            chosen = [(j, rec.references[j])]
        for j, ref in chosen:
            pairs.append(
                _dataset_pair(rec, j, ref, prompt, vocab, pool, hard_fraction, rng, counts)
            )
    n_skipped = counts.pop("no_references", 0)
    report_skipped(
        stats, "skipped_no_references", n_skipped, "caption records", "records without references"
    )
    for k, n in counts.items():
        bump(stats, k, n)
    logging.getLogger(__name__).info("dataset negatives: %s", dict(sorted(counts.items())))
    return pairs


def _dataset_pair(rec, j, ref, prompt, vocab, pool, hard_fraction, rng, counts):
    """One pair of `make_dataset_pairs`: reference `j` of `rec` against a hard or easy negative."""
    from cwdpo.data.caption_negatives import EASY_SOURCE, other_image_caption, perturb
    from cwdpo.data.records import PreferenceRecord

    meta = {**rec.meta, "split": rec.split, "reference_index": j}
    want_hard = rng.random() < hard_fraction
    p = perturb(ref, vocab, rng, rec.references) if want_hard else None
    if p is not None:
        text, source = p.text, p.source
        meta["perturbed"] = {"kind": p.kind, "from": p.original, "to": p.replacement}
    else:
        text, meta["negative_image_id"] = other_image_caption(rec, pool, rng)
        source = EASY_SOURCE
        if want_hard:
            meta["fallback"] = "no_hard_negative"
            counts["hard_fallback_to_easy"] += 1
    counts[source] += 1
    return PreferenceRecord(
        image_id=rec.image_id,
        image=rec.image,
        prompt=prompt,
        chosen=ref,
        rejected=text,
        source=source,
        meta=meta,
    )


def cpu_trainer(root: Path, steps: int, callbacks=(), **kw):
    """A quiet CPU `L.Trainer` for live callback tests: no logger, checkpoints, sanity check,
    val loop, bars or summary unless `kw` turns them on."""
    import lightning as L

    settings = dict(logger=False, enable_checkpointing=False, num_sanity_val_steps=0)
    settings |= dict(limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=list(callbacks),
        default_root_dir=str(root),
        **(settings | kw),
    )


def shapes_sft(backbone, sizes: dict[str, int], steps: int, lr: float = 3e-3, batch_size: int = 4):
    """(SFT-C module, caption data module) on a small ShapesWorld, for live callback tests."""
    from functools import partial

    import torch

    from cwdpo.data.datamodules import CaptionDataModule
    from cwdpo.data.sources import ShapesSource
    from cwdpo.stages import SFTCModule

    src = ShapesSource(sizes=sizes)
    dm = CaptionDataModule(
        src,
        src.captions("train"),
        batch_size=batch_size,
        seed=0,
        collate=backbone.collate,
        collate_pairs=backbone.collate_pairs,
    )
    module = SFTCModule(backbone, optimizer=partial(torch.optim.AdamW, lr=lr), total_steps=steps)
    return module, dm
