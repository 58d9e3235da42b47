"""The run directory's shared files, with one owner.

Every stage of a run writes its curves into the same `<run>/`. This module is the one that
knows the files the stages share: `stages.json` (each stage's run-wide step offset, length
and stop reason, so later stages continue the run's step axis), and how the long-format CSVs
(`probes.csv`, `dynamics.csv`, …) are appended. The callbacks name their own files; none of
them touches `stages.json` but through this module. (`RunState`, in `run/run_state.py`,
owns the other half of a run directory: the per-stage "done" markers and checkpoints.)

Under DDP every rank computes the same rows; rank zero alone writes.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L

from cwdpo.utils.dist import is_rank_zero
from cwdpo.utils.io import atomic_write_text
from cwdpo.utils.safe_log import FAILURES

STAGES_JSON = "stages.json"


class StageAware:
    """Knows its stage name, run dir and whether it is the run's first stage.

    The pipeline calls `set_stage` (base SFT and SFT-C share a LightningModule class, so the
    module cannot tell them apart); used alone, the stage comes from `pl_module.stage_name`
    and the run dir from `trainer.default_root_dir`.
    """

    stage: str | None = None
    out_dir: Path | None = None
    first: bool | None = None

    def set_stage(self, stage: str, out_dir: str | Path, first: bool) -> None:
        self.stage, self.out_dir, self.first = stage, Path(out_dir), first

    def resolve_stage(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stage is None:
            self.stage = getattr(pl_module, "stage_name", "stage")
        if self.out_dir is None:
            self.out_dir = Path(trainer.default_root_dir)
        if self.first is None:  # a fresh dir, or this stage run again in the same dir
            done = [s["stage"] for s in read_stages(self.out_dir)]
            self.first = not done or self.stage in done
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def clear_run_files(self, *names: str) -> None:
        """A fresh run: this callback's stale files of the dir go, and so does the stage index."""
        for name in (*names, STAGES_JSON):
            (self.out_dir / name).unlink(missing_ok=True)


def read_stages(out_dir: str | Path) -> list[dict[str, Any]]:
    return read_json(Path(out_dir) / STAGES_JSON, [])


def stage_offset(out_dir: str | Path, stage: str, first: bool) -> int:
    """Run-wide step at which `stage` starts: the sum of the earlier stages' steps."""
    if first:
        return 0
    offset = 0
    for s in read_stages(out_dir):
        if s["stage"] == stage:
            return int(s["offset"])
        offset = int(s["offset"]) + int(s["steps"])
    return offset


def record_stage(out_dir: str | Path, stage: str, offset: int, steps: int, **extra: Any) -> None:
    """Add/update this stage's entry in `<run>/stages.json` (offset, steps, stop reason…)."""
    if not is_rank_zero():
        return
    stages = read_stages(out_dir)
    entry = next((s for s in stages if s["stage"] == stage), None)
    if entry is None:
        entry = {"stage": stage}
        stages.append(entry)
    entry.update({"offset": int(offset), "steps": int(steps), **extra})
    stages.sort(key=lambda s: s["offset"])
    atomic_write_text(Path(out_dir) / STAGES_JSON, json.dumps(stages, indent=2) + "\n")


def read_json(path: Path, default: Any) -> Any:
    """The file's JSON, or `default` when there is no file."""
    return json.loads(path.read_text()) if path.is_file() else default


def append_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append rows; the header is the first writer's (later unknown keys are dropped)."""
    if not rows or not is_rank_zero():  # under DDP one rank writes the run dir
        return
    with FAILURES.guard(f"csv {path.name}"):
        _append_csv(path, rows)


def _append_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    exists = path.is_file() and path.stat().st_size > 0
    if exists:
        with path.open(newline="") as f:
            fields = next(csv.reader(f))
    else:
        fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if not exists:
            w.writeheader()
        w.writerows(rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def numeric_row(row: Mapping[str, str]) -> dict[str, Any]:
    """A CSV row back in numbers: step / run_step / n as int, the rest float where it parses."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        try:
            out[k] = int(v) if k in ("step", "run_step", "n") else float(v)
        except (TypeError, ValueError):
            out[k] = v
    return out
