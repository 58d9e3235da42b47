"""Finished-run readers: the setting, final metrics, stability and saved test captions of a run.

A finished run is a directory with `results.json` (written by `cwdpo.run.pipeline`); not to be
confused with `cwdpo.analysis.dynamics`, which reads the probe / dynamics files of any run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cwdpo.analysis.tables import COLUMNS
from cwdpo.utils.overrides import plain_group_overrides

Setting = tuple[str, list[str]]  # (experiment name, overrides that define the setting)
Loaded = tuple[Path, Setting, dict[str, float]]  # (run, setting, final metric row)


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Finished run directories (with `results.json`) below `paths`; raises if none."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no such run or multirun directory: {p}")
        runs += sorted(r.parent for r in p.rglob("results.json"))
    if not runs:
        raise FileNotFoundError(f"no results.json under {', '.join(map(str, paths))}")
    return runs


def run_setting(run: Path, results: dict[str, Any]) -> Setting:
    """(experiment name, overrides without seed/paths/hydra/experiment): what defines a setting."""
    ov_file = run / ".hydra" / "overrides.yaml"
    overrides: list[str] = []
    if ov_file.is_file():
        import yaml

        skip = (
            "seed",
            "hydra",
            "paths",
            "model.path",
            "experiment",
            "stage.skip",
            "callbacks.heldout",
        )  # where it started; how the held-out curve was measured (not what trained)
        # `+debug=fast` (runs before the groups joined the defaults list) = `debug=fast`
        overrides = plain_group_overrides(
            [
                o
                for o in (yaml.safe_load(ov_file.read_text()) or [])
                if not o.split("=")[0].lstrip("+~").startswith(skip)
            ]
        )
    return results.get("config", {}).get("experiment", "default"), sorted(overrides)


def stability(
    csv: Path,
    window: int = 50,
    spike_z: float = 3.0,
    target: float = 0.9,
    target_key: str = "train/rewards/accuracies",
) -> dict[str, float]:
    """Std of loss and gradient norm over the last `window` steps; loss spikes = steps whose
    loss exceeds the trailing-window mean by `spike_z` trailing stds; steps to target = first
    step where the rolling mean of `target_key` over 10 logged values reaches `target`."""
    if not csv.is_file():
        return {}
    df = pd.read_csv(csv)
    out: dict[str, float] = {}
    for key, name in (("train/loss", "loss_std"), ("train/grad_norm", "grad_norm_std")):
        if key in df:
            s = df[["step", key]].dropna().drop_duplicates("step")[key]
            out[name] = float(s.tail(window).std()) if len(s) > 1 else math.nan
    if "train/loss" in df:
        s = (
            df[["step", "train/loss"]]
            .dropna()
            .drop_duplicates("step")["train/loss"]
            .reset_index(drop=True)
        )
        mean, std = (
            s.rolling(10, min_periods=5).mean().shift(1),
            s.rolling(10, min_periods=5).std().shift(1),
        )
        out["loss_spikes"] = float(((s - mean) > spike_z * std.clip(lower=1e-8)).sum())
    if target_key in df:
        t = df[["step", target_key]].dropna().drop_duplicates("step")
        roll = (
            t[target_key].rolling(10, min_periods=10).mean()
        )  # a full window, not one lucky batch
        hit = t["step"][roll >= target]
        out["steps_to_target"] = float(hit.iloc[0]) if len(hit) else math.nan
    return out


def heldout_convergence(
    csv: Path, stage: str, gain: float = 1.0, metrics: Sequence[str] = ("f1", "score")
) -> dict[str, float]:
    """Steps to a common held-out target: the first evaluation of `<run>/heldout.csv`
    (cwdpo.callbacks.heldout) at which the stage's held-out metric (the first of `metrics` the
    file has) is at least its stage-start value + `gain`. Stage-2 methods of one seed start from
    the same policy, so they share the start value and the target. NaN if never reached; {} if
    the run has no curve."""
    if not csv.is_file():
        return {}
    df = pd.read_csv(csv)
    df = df[df["stage"] == stage].drop_duplicates("step", keep="last").sort_values("step")
    metric = next((m for m in metrics if m in df and df[m].notna().any()), None)
    if metric is None or df.empty or int(df["step"].iloc[0]) != 0:
        return {}
    values = df[metric].to_numpy(dtype=float)
    hit = df["step"][values >= values[0] + gain]
    return {
        "steps_to_heldout": float(hit.iloc[0]) if len(hit) else math.nan,
        "heldout_gain_final": float(values[-1] - values[0]),
        # stability on one scale for every objective (loss std is not: the losses differ)
        "heldout_jitter": float(abs(values[1:] - values[:-1]).mean()) if len(values) > 1 else 0.0,
    }


def load_run(
    run: Path, heldout_gain: float = 1.0, **target: Any
) -> tuple[Setting, dict[str, float]]:
    """(setting, final-stage metric row) of one finished run, the unit the report aggregates;
    `target`: `stability`'s target options, `heldout_gain`: `heldout_convergence`'s gain."""
    res = json.loads((run / "results.json").read_text())
    stages = res["stages"]
    last_name = list(stages)[-1]
    last = stages[last_name]
    row = {k: float(last[k]) for k, _, _ in COLUMNS if isinstance(last.get(k), int | float)}
    row.update(stability(run / "csv" / last_name / "metrics.csv", **target))
    row.update(heldout_convergence(run / "heldout.csv", last_name, heldout_gain))
    row["seed"] = float(res.get("config", {}).get("seed", math.nan))
    return run_setting(run, res), row


def final_outputs(run: Path) -> list[str] | None:
    """The last stage's test captions, from its done-marker (None for runs without one)."""
    stages = json.loads((run / "results.json").read_text())["stages"]
    marker = run / "checkpoints" / f"{list(stages)[-1]}.done.json"
    if not marker.is_file():
        return None
    outputs = json.loads(marker.read_text()).get("outputs")
    return list(outputs) if outputs else None


def eval_data(run: Path) -> dict[str, Any] | None:
    """What fixes a run's test set: its data source config, eval split and record count."""
    cfg_file = run / "config.yaml"
    if not cfg_file.is_file():
        return None
    import yaml

    cfg = yaml.safe_load(cfg_file.read_text()) or {}
    ev = cfg.get("eval", {})
    return {
        "source": cfg.get("data", {}).get("source"),
        "split": ev.get("split"),
        "n_records": ev.get("n_records"),
    }
