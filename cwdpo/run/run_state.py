"""What a run directory says about its stages, for `resume`: which are done, where an unfinished
one resumes, and which directory `resume=` names.

- `RunState`: per-stage "done" markers in `<run>/checkpoints/`, written atomically after the
  stage's HF save and evaluation, and the stage's `last.ckpt` to resume a stage mid-way; a fresh
  run in a used directory clears an earlier run's state.
- `resume_dir`: `resume=null|true|<path>` → the run directory to continue.

Why in cwdpo/run: the layout it reads (`checkpoints/<stage>.done.json`, `<stage>_hf/`,
`csv/<stage>/`) is the pipeline's, and only the run layer (pipeline, and the bench above it)
uses it. The files several layers append to (`stages.json`, the CSVs) are `utils/run_files.py`'s;
the attempts' wall clock is `run/attempts.py`'s; the checkpoint files themselves
`utils/checkpoint_io.py`'s.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cwdpo.utils.io import atomic_write_json
from cwdpo.utils.run_dir import MissingRunDirError

log = logging.getLogger(__name__)


class RunState:
    """Which stages of a run directory are done, and where an unfinished one can resume.

    A stage is done when `<run>/checkpoints/<stage>.done.json` (metrics + generated outputs,
    written atomically after the HF save and evaluation) and `<run>/checkpoints/<stage>_hf/`
    exist. The pseudo-stage "start" (evaluation before training) has a marker but no HF dir.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"

    def marker(self, stage: str) -> Path:
        return self.ckpt_dir / f"{stage}.done.json"

    def hf_dir(self, stage: str) -> Path:
        return self.ckpt_dir / f"{stage}_hf"

    def stage_ckpt_dir(self, stage: str) -> Path:
        return self.ckpt_dir / stage

    def is_done(self, stage: str) -> bool:
        if not self.marker(stage).is_file():
            return False
        return stage == "start" or (self.hf_dir(stage) / "config.json").is_file()

    def load_done(self, stage: str) -> dict[str, Any] | None:
        if not self.is_done(stage):
            return None
        return json.loads(self.marker(stage).read_text())

    def mark_done(self, stage: str, metrics: Mapping[str, Any], outputs: list[str]) -> None:
        atomic_write_json(
            self.marker(stage), {"stage": stage, "metrics": dict(metrics), "outputs": list(outputs)}
        )

    def last_checkpoint(self, stage: str) -> Path | None:
        """The newest `last*.ckpt` (ModelCheckpoint writes `last-v1.ckpt` if it could not
        restore its own state, e.g. after its settings changed)."""
        d = self.stage_ckpt_dir(stage)
        found = (
            sorted(d.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime_ns) if d.is_dir() else []
        )
        return found[-1] if found else None

    def csv_file(self, stage: str) -> Path:
        """The stage's metrics CSV (conf/logger/csv.yaml: `<run>/csv/<stage>/metrics.csv`)."""
        return self.run_dir / "csv" / stage / "metrics.csv"

    def clear(self, stages: list[str]) -> None:
        """A fresh (non-resume) run in a used directory: drop markers, Lightning checkpoints and
        metrics CSVs of earlier runs, so nothing stale is ever resumed from or kept (the CSV
        logger keeps an existing file's rows, for resume)."""
        stale = [self.marker(s) for s in ["start", *stages] if self.marker(s).exists()]
        stale += [self.stage_ckpt_dir(s) for s in stages if self.stage_ckpt_dir(s).exists()]
        stale += [self.csv_file(s) for s in stages if self.csv_file(s).exists()]
        (self.run_dir / "wandb_run_id").unlink(missing_ok=True)  # a fresh run is a new W&B run
        if stale:
            log.warning(
                "fresh run in %s: removing state of an earlier run (%s); pass resume=true "
                "to continue it instead",
                self.run_dir,
                ", ".join(p.name for p in stale),
            )
        for p in stale:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def resume_dir(resume: Any, output_dir: str | Path) -> Path | None:
    """`resume=null|false` → None; `resume=true` → the run's own output dir; `resume=<path>` →
    that run directory (which must exist)."""
    if (
        resume is None
        or resume is False
        or (isinstance(resume, str) and resume.lower() in ("", "false", "null", "none"))
    ):
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() == "true"):
        return Path(output_dir)
    p = Path(str(resume)).expanduser()
    if not p.is_dir():
        raise MissingRunDirError(f"resume={resume}: no such run directory")
    return p
