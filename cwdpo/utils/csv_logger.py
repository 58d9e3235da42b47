"""A CSVLogger whose history survives resume.

Lightning's `CSVLogger` deletes `<run>/csv/<stage>/metrics.csv` when its directory is not
empty ("Previous log files in this directory will be deleted"), so a stage resumed from a
checkpoint lost every row logged before it — and `cwdpo.report`'s stability columns changed.
`ResumableCSVLogger` keeps the old file: at the first write of this process it keeps the rows
whose step is below the first step logged now (rows after the checkpoint are logged again, so
they are replaced, never duplicated) and writes them back with the new rows, under the union
of both headers, atomically. Lightning saves the logger after every `log_metrics`, so the file
on disk always holds every row up to the last logged step. A fresh (non-resume) run drops its
stage's old file first (`RunState.clear`), so nothing of an earlier run is kept.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from cwdpo.utils.io import atomic_write_text


def _step(row: dict[str, Any]) -> float:
    try:
        return float(row.get("step", ""))
    except (TypeError, ValueError):
        return float("inf")  # a row without a step cannot be placed: dropped with the tail


class ResumableExperimentWriter(ExperimentWriter):
    """Keeps an existing metrics.csv instead of deleting it; merges it at the first save."""

    def _check_log_dir_exists(self) -> None:
        self._previous: list[dict[str, Any]] | None = None
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self._previous = list(csv.DictReader(f))

    def save(self) -> None:
        previous = getattr(self, "_previous", None)
        if previous is None or not self.metrics:
            super().save()
            return
        first = min(_step(m) for m in self.metrics)
        kept = [r for r in previous if _step(r) < first]
        self._previous = None
        keys = sorted(set().union(*kept, *self.metrics) if kept else set().union(*self.metrics))
        self.metrics_keys = keys
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(kept)
        writer.writerows(self.metrics)
        atomic_write_text(self.metrics_file_path, buf.getvalue())
        self.metrics = []


class ResumableCSVLogger(CSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` with `ResumableExperimentWriter` (see module doc).

    One per stage: the pipeline's `set_stage` names its version after the stage, so each
    stage's rows go to `<save_dir>/<name>/<stage>/metrics.csv`."""

    def set_stage(self, stage: str, out_dir: Any = None, first: bool | None = None) -> None:
        if self._experiment is None:  # before the first write, while log_dir can still move
            self._version = stage

    @property
    @rank_zero_experiment
    def experiment(self) -> ResumableExperimentWriter:  # type: ignore[override]
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumableExperimentWriter(log_dir=self.log_dir)
        return self._experiment
