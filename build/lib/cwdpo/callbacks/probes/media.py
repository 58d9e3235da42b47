"""What the probe callback shows besides scalars: W&B Δlogp line series and sample captions.

Both are never fatal (a failure is one warning and a count); W&B is imported only when a
W&B logger is attached.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from cwdpo.callbacks.probes.config import ProbeConfig
from cwdpo.callbacks.probes.sets import probe_records
from cwdpo.data.records import load_images, record_prompt
from cwdpo.utils.dist import is_rank_zero
from cwdpo.utils.io import atomic_write_text
from cwdpo.utils.run_files import read_csv
from cwdpo.utils.safe_log import never_fatal


def _at(trajectory: Sequence[dict[str, Any]], group: str, step: int, column: str) -> float:
    for r in trajectory:
        if r["group"] == group and r["step"] == step:
            return r[column]
    return float("nan")


@never_fatal("probe/delta_logp curves")
def log_curves(
    trainer: L.Trainer,
    stage: str,
    groups: Sequence[str],
    trajectory: Sequence[dict[str, Any]],
    probes_csv: Path,
) -> None:
    """W&B line series of the Δlogp curves: this stage, and the run so far."""
    from cwdpo.callbacks.wandb_logger import has_wandb, log_media

    if not has_wandb(trainer):
        return
    import wandb

    groups = list(groups)
    steps = sorted({r["step"] for r in trajectory})
    ys = [[float(_at(trajectory, g, s, "mean")) for s in steps] for g in groups]
    data = {
        "probe/delta_logp": wandb.plot.line_series(
            xs=steps,
            ys=ys,
            keys=groups,
            title=f"{stage}: Δℓ̄ from the stage start",
            xname=f"{stage}/step",
        )
    }
    rows = read_csv(probes_csv)
    run_steps = sorted({int(r["run_step"]) for r in rows})
    by = {(r["group"], int(r["run_step"])): float(r["run_mean"]) for r in rows}
    run_groups = list(dict.fromkeys(r["group"] for r in rows))
    ys = [[by.get((g, s), float("nan")) for s in run_steps] for g in run_groups]
    run_plot = wandb.plot.line_series(
        xs=run_steps,
        ys=ys,
        keys=run_groups,
        title="Δℓ̄ from the run start (all stages)",
        xname="run step",
    )
    log_media(trainer, {"run/probe/delta_logp": run_plot}, trainer.global_step, prefix=False)
    log_media(trainer, data, trainer.global_step)


@never_fatal("samples/captions")
@torch.no_grad()
def log_samples(
    trainer: L.Trainer, pl_module: L.LightningModule, cfg: ProbeConfig, stage: str, out_dir: Path
) -> None:
    """A few greedy captions of probe images: `<run>/samples/<stage>.json` + a W&B table."""
    if cfg.n_samples <= 0:
        return
    source = getattr(trainer.datamodule, "source", None)
    if source is None:
        return
    recs = probe_records(source, cfg.split, cfg.fallback_split, cfg.n_samples)
    images = [load_images(r) for r in recs]
    outs = pl_module.backbone.generate(
        images,
        [record_prompt(r, source.prompt) for r in recs],
        max_new_tokens=cfg.sample_max_new_tokens,
    )
    rows = [
        {
            "image_id": r.image_id,
            "reference": r.references[0],
            "generated": o,
            "score": source.score(o, r),
            "positive": bool(source.is_positive(o, r)),
        }
        for r, o in zip(recs, outs)
    ]
    if not is_rank_zero():  # all ranks generate (FSDP needs every rank in a forward); one writes
        return
    d = out_dir / "samples"
    d.mkdir(exist_ok=True)
    atomic_write_text(d / f"{stage}.json", json.dumps(rows, indent=2) + "\n")
    _samples_table(trainer, images, rows)


def _samples_table(trainer: L.Trainer, images: list, rows: list[dict[str, Any]]) -> None:
    from cwdpo.callbacks.wandb_logger import has_wandb, log_media

    if not has_wandb(trainer):
        return
    import wandb

    table = wandb.Table(columns=["image", "image_id", "reference", "generated", "score"])
    for im, row in zip(images, rows):
        cols = (row["image_id"], row["reference"], row["generated"], row["score"])
        table.add_data(wandb.Image(im), *cols)
    log_media(trainer, {"samples/captions": table}, trainer.global_step)
