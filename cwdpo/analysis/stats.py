"""Runs grouped by setting: mean ± std over seeds, paired per-seed differences (t-interval,
t-test, sign-flip test, Holm across the table, MDE, bootstrap CI; caption-level McNemar for
per-caption rates), and the choice of one setting per experiment on val runs."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cwdpo.analysis.baseline import win_vs_baseline
from cwdpo.analysis.caption_tests import row_mcnemar
from cwdpo.analysis.inference import (
    holm,
    mde_paired_t,
    paired_t_interval,
    paired_t_pvalue,
    sign_flip_pvalue,
)
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
    return {k: [row for _, _, row in v] for k, v in group_loaded(loaded).items()}


def group_loaded(loaded: Sequence[Loaded]) -> dict[str, list[Loaded]]:
    """Setting name (experiment + overrides not shared by every run) → its loaded runs."""
    common = set.intersection(*(set(ov) for _, (_, ov), _ in loaded)) if loaded else set()
    groups: dict[str, list[Loaded]] = defaultdict(list)
    for x in loaded:
        _, (name, ov), _ = x
        extra = [o for o in ov if o not in common]
        groups[name + (" " + " ".join(extra) if extra else "")].append(x)
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
    """Per-seed A − B on `key` over the seeds both settings ran: mean, t 95% interval
    (`t_ci95`), paired t-test p (`t_p`), exact sign-flip p (`perm_p`), the effect the paired
    t-test would detect with 80% power at α = 0.05 given these diffs' sd (`mde80`), the
    percentile-bootstrap 95% CI (`ci95`, kept for reference: it under-covers at n = 5) and the
    seeds where A > B. A bare experiment name stands for its setting when it has exactly one
    (e.g. after --select)."""

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
    sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else math.nan
    return {
        "a": a,
        "b": b,
        "metric": key,
        "seeds": seeds,
        "diffs": diffs,
        "mean": float(np.mean(diffs)) if diffs else math.nan,
        "t_ci95": list(paired_t_interval(diffs)),
        "t_p": paired_t_pvalue(diffs),
        "perm_p": sign_flip_pvalue(diffs),
        "sd": sd,
        "mde80": mde_paired_t(sd, len(diffs)),
        "ci95": [lo, hi],
        "wins": sum(x > 0 for x in diffs),
    }


def compare(
    loaded: Sequence[Loaded], specs: Sequence[str], metrics: Sequence[str], n_boot: int = 10_000
) -> tuple[list[dict[str, Any]], list[str]]:
    """(paired differences of every `A:B` spec on every metric, why a spec was skipped).

    Every row also gets `holm_p`: its t-test p Holm-corrected across the table, i.e. over the
    t-test p-values of ALL rows of this report (every comparison × metric), so reading any row's
    significance keeps the family-wise error at α; `mde80_holm` is the MDE at Holm's strictest
    level α/m (m = rows with a t p), what a claim judged by Holm p < 0.05 needs in the worst
    case (`mde80` is at α). Rows of a per-caption binary rate
    (`caption_tests.CAPTION_RATES`, e.g. companion_halluc) whose runs' saved captions and scenes
    are readable get `mcnemar`: {b, c, p}, the exact McNemar test over captions paired by
    (seed, test image) and pooled over the seeds."""
    by_setting = group_loaded(loaded)
    groups = {k: [row for _, _, row in v] for k, v in by_setting.items()}
    runs_of = {k: {row["seed"]: run for run, _, row in v} for k, v in by_setting.items()}
    cache: dict[str, Any] = {}
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
    m = sum(not math.isnan(r["t_p"]) for r in rows)
    for r, p in zip(rows, holm([r["t_p"] for r in rows])):
        r["holm_p"] = p
        # the effect Holm's first (strictest) step can see: α / m, the row's sd and n
        r["mde80_holm"] = mde_paired_t(r["sd"], len(r["diffs"]), alpha=0.05 / max(m, 1))
        mc = row_mcnemar(runs_of[r["a"]], runs_of[r["b"]], r["seeds"], r["metric"], cache)
        if mc is not None:
            r["mcnemar"] = mc
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
