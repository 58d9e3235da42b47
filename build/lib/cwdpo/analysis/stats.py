"""Runs grouped by setting: mean ± std over seeds, paired per-seed differences with bootstrap
CIs, and the choice of one setting per experiment on val runs."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cwdpo.analysis.baseline import win_vs_baseline
from cwdpo.analysis.runs import Loaded, load_run
from cwdpo.analysis.tables import COLUMNS, STEP_COLUMNS


def load_all(
    runs: Sequence[Path],
    baseline: str | None = "sft_only",
    target: float = 0.9,
    target_key: str = "train/rewards/accuracies",
    selection: dict[str, set[str]] | None = None,
    heldout_gain: float = 1.0,
) -> list[Loaded]:
    """Rows of every run (win vs baseline added); with `selection`, only the val-selected setting
    of each selected experiment is kept."""
    loaded = [(r, *load_run(r, heldout_gain, target=target, target_key=target_key)) for r in runs]
    if selection:
        loaded = [
            x
            for x in loaded
            if x[1][0] not in selection
            or {o for o in x[1][1] if not o.startswith("eval.")} == selection[x[1][0]]
        ]
    if baseline:
        win_vs_baseline(loaded, baseline)
    return loaded


def aggregate(runs: Sequence[Path], **load: Any) -> dict[str, dict[str, Any]]:
    """Setting → mean ± std of every column over its runs (see `aggregate_loaded`); `load`:
    `load_all`'s options (baseline, target, target_key, selection, heldout_gain)."""
    return aggregate_loaded(load_all(runs, **load))


def aggregate_loaded(loaded: Sequence[Loaded]) -> dict[str, dict[str, Any]]:
    """Setting → {"n": runs, column: {"mean", "std"[, "reached", "of"]}} over loaded rows."""
    groups = group_rows(loaded)  # overrides shared by every run (e.g. a budget) name no setting
    out = {}
    for key, rows in sorted(groups.items()):
        stats: dict[str, Any] = {"n": len(rows)}
        for k, _, scale in COLUMNS:
            present = [row[k] * scale for row in rows if k in row]
            vals = np.array([v for v in present if not math.isnan(v)])
            if len(vals):
                stats[k] = {
                    "mean": float(vals.mean()),
                    "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                }
                if k not in STEP_COLUMNS and len(vals) < len(rows):
                    stats[k].update(reached=len(vals), of=len(rows))
            if k in STEP_COLUMNS and present:  # runs that never reach it are not averaged
                stats[k] = {**stats.get(k, {}), "reached": len(vals), "of": len(present)}
        out[key] = stats
    return out


def group_rows(loaded: Sequence[Loaded]) -> dict[str, list[dict[str, float]]]:
    """Setting name (experiment + overrides not shared by every run) → its runs' rows."""
    common = set.intersection(*(set(ov) for _, (_, ov), _ in loaded)) if loaded else set()
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for _, (name, ov), row in loaded:
        extra = [o for o in ov if o not in common]
        groups[name + (" " + " ".join(extra) if extra else "")].append(row)
    return dict(groups)


def bootstrap_ci(
    diffs: Sequence[float], n_boot: int = 10_000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over seeds (resampling seeds with replacement)."""
    d = np.asarray(diffs, dtype=float)
    if len(d) == 0:
        return math.nan, math.nan
    means = np.random.default_rng(seed).choice(d, size=(n_boot, len(d)), replace=True).mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def paired_differences(
    groups: dict[str, list[dict[str, float]]], a: str, b: str, key: str, n_boot: int = 10_000
) -> dict[str, Any]:
    """Per-seed A − B on `key` over the seeds both settings ran, mean and bootstrap 95% CI.
    A bare experiment name stands for its setting when it has exactly one (e.g. after --select)."""

    def resolve(name: str) -> str:
        if name in groups:
            return name
        only = [g for g in groups if g.split(" ")[0] == name]
        if len(only) != 1:
            raise KeyError(
                f"--compare {a}:{b}: no single setting {name!r}; settings: {sorted(groups)}"
            )
        return only[0]

    a, b = resolve(a), resolve(b)
    va = {r["seed"]: r[key] for r in groups[a] if key in r and not math.isnan(r[key])}
    vb = {r["seed"]: r[key] for r in groups[b] if key in r and not math.isnan(r[key])}
    seeds = sorted(set(va) & set(vb))
    diffs = [va[s] - vb[s] for s in seeds]
    lo, hi = bootstrap_ci(diffs, n_boot)
    return {
        "a": a,
        "b": b,
        "metric": key,
        "seeds": seeds,
        "diffs": diffs,
        "mean": float(np.mean(diffs)) if diffs else math.nan,
        "ci95": [lo, hi],
        "wins": sum(x > 0 for x in diffs),
    }


def compare(
    loaded: Sequence[Loaded], specs: Sequence[str], metrics: Sequence[str], n_boot: int = 10_000
) -> tuple[list[dict[str, Any]], list[str]]:
    """(paired differences of every `A:B` spec on every metric, why a spec was skipped)."""
    groups = group_rows(loaded)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for spec in specs:
        if ":" not in spec:
            raise SystemExit(f"--compare expects A:B (two setting names), got {spec!r}")
        a, b = spec.split(":", 1)
        try:
            rows += [paired_differences(groups, a, b, m, n_boot) for m in metrics]
        except KeyError as err:  # e.g. the control ran fewer methods: say so, go on
            skipped.append(str(err.args[0]))
    return rows, skipped


def select_on_val(val_runs: Sequence[Path], key: str) -> dict[str, set[str]]:
    """Per experiment, the overrides of its best setting by mean `key` over the *val* runs
    (`eval.split=val`): the test report then keeps only that setting. `eval.*` overrides are
    ignored so the same setting evaluated on test matches."""
    best: dict[str, tuple[float, set[str]]] = {}
    by: dict[tuple[str, frozenset[str]], list[float]] = defaultdict(list)
    for run in val_runs:
        (name, ov), row = load_run(run)
        if key in row and not math.isnan(row[key]):
            by[(name, frozenset(o for o in ov if not o.startswith("eval.")))].append(row[key])
    for (name, ov), vals in by.items():
        m = float(np.mean(vals))
        if name not in best or m > best[name][0]:
            best[name] = (m, set(ov))
    return {name: ov for name, (_, ov) in best.items()}
