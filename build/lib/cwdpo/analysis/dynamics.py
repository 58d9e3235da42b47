"""The probe and CW-DPO dynamics files of a run directory (never W&B), for the plots and the
review notebook.

A path is a run if it holds `probes.csv` or `dynamics.csv`; otherwise it is searched for runs.
Not `cwdpo.analysis.runs`, which reads finished runs (`results.json`) for the report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

RUN_FILES = ("probes.csv", "dynamics.csv")


@dataclass
class Run:
    """Everything the plots and the review notebook need from one run directory."""

    path: Path
    label: str
    probes: pd.DataFrame | None = None
    dynamics: pd.DataFrame | None = None  # long: stage, step, run_step, metric, value
    weights: pd.DataFrame | None = None  # one row per pair: stage, step, run_step, w, a, …
    stages: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str) -> pd.DataFrame:
        """One dynamics metric as (stage, step, run_step, value) rows."""
        if self.dynamics is None:
            return pd.DataFrame(columns=["stage", "step", "run_step", "value"])
        return self.dynamics[self.dynamics.metric == name]

    @property
    def early_stops(self) -> dict[str, str]:
        """stage → reason, for stages that a probe rule ended early."""
        return {
            s: m["early_stop"]
            for s, m in self.results.get("stages", {}).items()
            if isinstance(m, dict) and m.get("early_stop")
        }


def _csv(path: Path) -> pd.DataFrame | None:
    if not path.is_file() or path.stat().st_size == 0:
        return None
    return pd.read_csv(path)


def _json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def is_run(path: Path) -> bool:
    return any((path / f).is_file() for f in RUN_FILES)


def find_dynamics_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories with probe / dynamics files (`RUN_FILES`) among / below `paths`, in the
    given order (sorted below each). Not `cwdpo.analysis.runs.find_runs`, which finds finished runs
    (`results.json`) and raises when there are none."""
    out: list[Path] = []
    for p in map(Path, paths):
        if is_run(p):
            out.append(p)
            continue
        found = sorted({f.parent for name in RUN_FILES for f in p.glob(f"**/{name}")})
        if not found:
            log.warning("no run found in %s (no probes.csv / dynamics.csv)", p)
        out += found
    return list(dict.fromkeys(out))


def _overrides(path: Path) -> str:
    f = path / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return ""
    import yaml

    items = yaml.safe_load(f.read_text()) or []
    return ",".join(str(x) for x in items if not str(x).startswith(("hydra.", "+debug", "debug=")))


def load_dynamics_run(path: str | Path, label: str | None = None) -> Run:
    """Every file a plot reads from one run directory (missing ones empty)."""
    path = Path(path)
    config = _json(path / "config.json", {})
    run = Run(
        path=path,
        label=label or config.get("experiment_name") or path.name,
        probes=_csv(path / "probes.csv"),
        dynamics=_csv(path / "dynamics.csv"),
        weights=_csv(path / "cooling_weights.csv"),
        stages=_json(path / "stages.json", []),
        results=_json(path / "results.json", {}),
        config=config,
    )
    return run


def load_runs(paths: Sequence[str | Path], labels: Sequence[str] | None = None) -> list[Run]:
    """Load runs; labels default to the experiment name, made unique with overrides / dir name."""
    dirs = find_dynamics_runs(paths)
    runs = [
        load_dynamics_run(d, labels[i] if labels and i < len(labels) else None)
        for i, d in enumerate(dirs)
    ]
    if not labels:
        seen: dict[str, int] = {}
        for r in runs:
            seen[r.label] = seen.get(r.label, 0) + 1
        for r in runs:
            if seen[r.label] > 1:
                r.label = f"{r.label} [{_overrides(r.path) or r.path.name}]"
    return runs
