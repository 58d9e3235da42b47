"""The report's figures: one bar panel per metric over settings (report.png) and each one-knob
sweep as curves (report_sweeps.png). matplotlib is imported only when drawing."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cwdpo.analysis.tables import COLUMNS, HEADERS

PLOT_KEYS = (
    "fact_accuracy",
    "cider",
    "win_vs_baseline",
    "calib/ece",
    "calib/entropy",
    "calib/mean_top1_prob",
    "loss_std",
    "grad_norm_std",
)


def plot(agg: dict[str, dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(k, h) for k, h, _ in COLUMNS if k in PLOT_KEYS and any(k in g for g in agg.values())]
    if not keys:
        return []
    fig, axes = plt.subplots(
        1, len(keys), figsize=(2.6 * len(keys) + 2.5, 1.5 + 0.22 * len(agg)), sharey=True
    )  # one row per setting in every panel, NaNs included
    axes = np.atleast_1d(axes)
    names = list(agg)
    for ax, (k, h) in zip(axes, keys):
        means = [agg[n].get(k, {}).get("mean", np.nan) for n in names]
        stds = [agg[n].get(k, {}).get("std", 0.0) for n in names]
        ax.barh(range(len(names)), means, xerr=stds, color="tab:blue", alpha=0.8)
        if k == "win_vs_baseline":
            ax.axvline(50.0, color="k", lw=0.8, ls="--")  # = the baseline
        if k in ("loss_std", "grad_norm_std"):
            ax.set_xscale("log")  # IPO's loss is on another scale
        ax.set_title(h, fontsize=9)
    axes[0].set_yticks(range(len(names)), names, fontsize=7)
    axes[0].set_ylim(len(names) - 0.5, -0.5)  # first setting on top, as in report.md
    fig.tight_layout()
    path = out_dir / "report.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path, *plot_sweeps(agg, out_dir)]


def sweep_series(agg: dict[str, dict[str, Any]]) -> dict[str, list[tuple[float, str]]]:
    """ "experiment key" → [(value, setting)] for settings that differ from the rest of their
    experiment in one numeric override only (e.g. ablation_mix's dataset fraction), ≥ 3 values."""
    series: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for name in agg:
        exp, *ov = name.split(" ")
        if len(ov) != 1 or "=" not in ov[0]:
            continue
        key, value = ov[0].split("=", 1)
        try:
            series[f"{exp} {key}"].append((float(value), name))
        except ValueError:
            continue
    return {k: sorted(v) for k, v in series.items() if len(v) >= 3}


def plot_sweeps(
    agg: dict[str, dict[str, Any]],
    out_dir: Path,
    keys: Sequence[str] = ("fact_accuracy", "win_vs_baseline", "calib/ece"),
) -> list[Path]:
    """report_sweeps.png: each one-knob sweep as curves (mean ± std over seeds) of `keys`."""
    import matplotlib.pyplot as plt

    series = sweep_series(agg)
    keys = [k for k in keys if any(k in g for g in agg.values())]
    if not series or not keys:
        return []
    fig, axes = plt.subplots(
        len(series), len(keys), figsize=(3.4 * len(keys), 2.6 * len(series)), squeeze=False
    )
    for row, (title, points) in zip(axes, series.items()):
        xs = [x for x, _ in points]
        for ax, k in zip(row, keys):
            ys = [agg[n].get(k, {}).get("mean", np.nan) for _, n in points]
            es = [agg[n].get(k, {}).get("std", 0.0) for _, n in points]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3)
            ax.set_xlabel(title.split(" ", 1)[1], fontsize=8)
            ax.set_title(f"{title.split(' ')[0]}: {HEADERS[k]}", fontsize=9)
    fig.tight_layout()
    path = out_dir / "report_sweeps.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
