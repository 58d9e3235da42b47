"""`python -m cwdpo.report <multirun dir> [...]`: aggregate runs into a markdown table + plots.

Runs are grouped by experiment and their Hydra overrides minus `seed`; every number is
mean ± std over the seeds of a group. Final metrics come from each run's results.json (last
stage); stability and steps-to-target from the last stage's metrics CSV.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cwdpo.utils.io import atomic_write_json, atomic_write_text

COLUMNS = (  # (key, header, scale)
    ("fact_accuracy", "facts %", 1.0), ("exact", "exact %", 1.0), ("cider", "CIDEr", 1.0),
    ("winrate/win_rate", "win vs prev stage %", 100.0), ("calib/ece", "ECE", 1.0),
    ("calib/entropy", "entropy", 1.0), ("calib/mean_top1_prob", "top-1 p", 1.0),
    ("loss_std", "loss std", 1.0), ("grad_norm_std", "‖g‖ std", 1.0),
    ("loss_spikes", "spikes", 1.0), ("steps_to_target", "steps→target", 1.0),
)


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no such run or multirun directory: {p}")
        runs += sorted(r.parent for r in p.rglob("results.json"))
    if not runs:
        raise FileNotFoundError(f"no results.json under {', '.join(map(str, paths))}")
    return runs


def run_setting(run: Path, results: dict[str, Any]) -> tuple[str, list[str]]:
    """(experiment name, overrides without seed/paths/hydra/experiment): what defines a setting."""
    ov_file = run / ".hydra" / "overrides.yaml"
    overrides: list[str] = []
    if ov_file.is_file():
        import yaml

        skip = ("seed", "hydra", "paths", "model.path", "experiment")
        overrides = [
            o for o in (yaml.safe_load(ov_file.read_text()) or [])
            if not o.split("=")[0].lstrip("+~").startswith(skip)
        ]
    return results.get("config", {}).get("experiment", "default"), sorted(overrides)


def stability(csv: Path, window: int = 50, spike_z: float = 3.0, target: float = 0.9,
              target_key: str = "train/rewards/accuracies") -> dict[str, float]:
    """Std of loss and gradient norm over the last `window` steps; loss spikes = steps whose
    loss exceeds the trailing-window mean by `spike_z` trailing stds; steps to target = first
    step where the 10-step rolling mean of `target_key` reaches `target`."""
    if not csv.is_file():
        return {}
    df = pd.read_csv(csv)
    out: dict[str, float] = {}
    for key, name in (("train/loss", "loss_std"), ("train/grad_norm", "grad_norm_std")):
        if key in df:
            s = df[["step", key]].dropna().drop_duplicates("step")[key]
            out[name] = float(s.tail(window).std()) if len(s) > 1 else math.nan
    if "train/loss" in df:
        s = df[["step", "train/loss"]].dropna().drop_duplicates("step")["train/loss"].reset_index(drop=True)
        mean, std = s.rolling(10, min_periods=5).mean().shift(1), s.rolling(10, min_periods=5).std().shift(1)
        out["loss_spikes"] = float(((s - mean) > spike_z * std.clip(lower=1e-8)).sum())
    if target_key in df:
        t = df[["step", target_key]].dropna().drop_duplicates("step")
        roll = t[target_key].rolling(10, min_periods=1).mean()
        hit = t["step"][roll >= target]
        out["steps_to_target"] = float(hit.iloc[0]) if len(hit) else math.nan
    return out


def load_run(run: Path) -> tuple[tuple[str, list[str]], dict[str, float]]:
    res = json.loads((run / "results.json").read_text())
    stages = res["stages"]
    last_name = list(stages)[-1]
    last = stages[last_name]
    row = {k: float(last[k]) for k, _, _ in COLUMNS if isinstance(last.get(k), int | float)}
    row.update(stability(run / "csv" / last_name / "metrics.csv"))
    row["seed"] = float(res.get("config", {}).get("seed", math.nan))
    return run_setting(run, res), row


def aggregate(runs: Sequence[Path]) -> dict[str, dict[str, Any]]:
    loaded = [load_run(r) for r in runs]
    # overrides shared by every run (e.g. a budget) do not name a setting: drop them
    common = set.intersection(*(set(ov) for (_, ov), _ in loaded)) if loaded else set()
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for (name, ov), row in loaded:
        extra = [o for o in ov if o not in common]
        groups[name + (" " + " ".join(extra) if extra else "")].append(row)
    out = {}
    for key, rows in sorted(groups.items()):
        stats: dict[str, Any] = {"n": len(rows)}
        for k, _, scale in COLUMNS:
            vals = np.array([row[k] * scale for row in rows if k in row and not math.isnan(row[k])])
            if len(vals):
                stats[k] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
        out[key] = stats
    return out


def markdown(agg: dict[str, dict[str, Any]]) -> str:
    cols = [(k, h) for k, h, _ in COLUMNS if any(k in g for g in agg.values())]
    lines = ["| setting | n | " + " | ".join(h for _, h in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for key, g in agg.items():
        cells = [f"{g[k]['mean']:.3g} ± {g[k]['std']:.2g}" if k in g else "–" for k, _ in cols]
        lines.append(f"| {key} | {g['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(agg: dict[str, dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(k, h) for k, h, _ in COLUMNS[:7] if any(k in g for g in agg.values())]
    if not keys:
        return []
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.6 + 0.15 * len(agg)))
    axes = np.atleast_1d(axes)
    names = list(agg)
    for ax, (k, h) in zip(axes, keys):
        means = [agg[n].get(k, {}).get("mean", np.nan) for n in names]
        stds = [agg[n].get(k, {}).get("std", 0.0) for n in names]
        ax.barh(range(len(names)), means, xerr=stds, color="tab:blue", alpha=0.8)
        ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names), fontsize=7)
        ax.set_title(h, fontsize=9)
    fig.tight_layout()
    path = out_dir / "report.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m cwdpo.report", description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="run or multirun directories (searched recursively)")
    ap.add_argument("--out", default=None, help="output directory (default: the first dir)")
    args = ap.parse_args(argv)
    runs = find_runs(args.dirs)
    agg = aggregate(runs)
    out = Path(args.out or args.dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(agg)
    atomic_write_text(out / "report.md", table)
    atomic_write_json(out / "report.json", agg)
    plot(agg, out)
    print(table)
    return table


if __name__ == "__main__":
    main()
