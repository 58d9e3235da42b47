"""`python -m cwdpo.doctor`: the model's self-checks (`cwdpo.model.checks`) on a configured
checkpoint and a few rows of the configured data; writes doctor.json and doctor.md."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from cwdpo.model.checks import Check, Rows, default_tolerance, run_checks, table


def rows_from_source(source: Any, split: str, n: int, seed: int = 0) -> Rows:
    """n rows of the configured data: image(s), prompt, first reference, a dataset negative."""
    import random

    from cwdpo.data.records import load_images, record_prompt

    recs = source.captions(split)[:n]
    rng = random.Random(seed)
    negs = [source.negative(r, rng, hard=True)[0] for r in recs]
    return Rows(
        [load_images(r) for r in recs],
        [record_prompt(r, source.prompt) for r in recs],
        [r.references[0] for r in recs],
        negs,
    )


def run_doctor(cfg: Any) -> tuple[list[Check], int]:
    import hydra

    from cwdpo.utils.io import atomic_write_json, atomic_write_text

    torch.manual_seed(int(cfg.get("seed", 0)))
    bb = hydra.utils.instantiate(cfg.model)
    if torch.cuda.is_available() and cfg.doctor.get("device", "auto") != "cpu":
        bb.model.to("cuda")
    source = hydra.utils.instantiate(cfg.data.source)
    rows = rows_from_source(
        source, cfg.doctor.split, int(cfg.doctor.n_rows), int(cfg.get("seed", 0))
    )
    tol = cfg.doctor.tol if cfg.doctor.tol is not None else default_tolerance(bb)
    checks = run_checks(bb, rows, float(tol))
    out = Path(cfg.paths.output_dir)
    text = table(checks)
    atomic_write_json(
        out / "doctor.json", {"model": str(cfg.model.path), "checks": [asdict(c) for c in checks]}
    )
    atomic_write_text(out / "doctor.md", text)
    print("\n" + text)
    failed = [c.name for c in checks if c.status == "fail"]
    if failed:
        print(
            f"doctor: {len(failed)} check(s) failed: {failed} — a long run would compute "
            "something wrong; see the detail column",
            file=sys.stderr,
        )
    return checks, 1 if failed else 0
