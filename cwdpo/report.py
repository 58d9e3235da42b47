"""`python -m cwdpo.report <multirun dir> [...]`: aggregate runs into a markdown table + plots.

Runs are grouped by experiment and their Hydra overrides minus `seed`; every number is
mean ± std over the seeds of a group. Final metrics come from each run's results.json (last
stage); stability and steps-to-target from the last stage's metrics CSV; the win-rate against a
baseline experiment (default `sft_only`) re-judges each run's saved test captions against the
baseline run of the same seed and test data (a sweep that also ran the baseline under its own
setting is compared with that one). A value a run cannot give is left out and counted: "(k/n)".
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra.utils
import numpy as np
import pandas as pd

from cwdpo.run.evaluation import win_rate
from cwdpo.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

COLUMNS = (  # (key, header, scale)
    ("fact_accuracy", "facts %", 1.0),
    ("exact", "exact %", 1.0),
    ("cider", "CIDEr", 1.0),
    ("win_vs_baseline", "win vs baseline %", 100.0),
    ("winrate/win_rate", "win vs prev stage %", 100.0),
    ("calib/ece", "ECE", 1.0),
    ("calib/entropy", "entropy", 1.0),
    ("calib/mean_top1_prob", "top-1 p", 1.0),
    ("loss_std", "loss std", 1.0),
    ("grad_norm_std", "‖g‖ std", 1.0),
    ("loss_spikes", "spikes", 1.0),
    ("steps_to_target", "steps→target", 1.0),
    # ShapesWorld ground truth (percent; cwdpo.metrics.hallucination / .teacher_forced)
    ("f1", "F1 %", 1.0),
    ("object_recall", "obj recall %", 1.0),
    ("chair_i", "CHAIR_i %", 1.0),
    ("chair_s", "CHAIR_s %", 1.0),
    ("companion_halluc", "companion halluc %", 1.0),
    ("pope/f1", "POPE F1", 1.0),
    ("pope_adv/accuracy", "POPE-adv acc", 1.0),
    ("malformed", "malformed %", 1.0),
    ("length", "length", 1.0),
    ("calib/content_ece", "content ECE", 1.0),
    ("calib/content_sce", "content SCE", 1.0),
    ("disp/chosen_fell", "gold logp fell %", 1.0),
)
PRIMARY = "f1"  # the study's pre-declared primary metric (falls back to facts % where absent)


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


def run_setting(run: Path, results: dict[str, Any]) -> tuple[str, list[str]]:
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
        )  # where it started
        overrides = [
            o
            for o in (yaml.safe_load(ov_file.read_text()) or [])
            if not o.split("=")[0].lstrip("+~").startswith(skip)
        ]
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


def load_run(run: Path, **target: Any) -> tuple[tuple[str, list[str]], dict[str, float]]:
    """(setting, final-stage metric row) of one finished run, the unit the report aggregates."""
    res = json.loads((run / "results.json").read_text())
    stages = res["stages"]
    last_name = list(stages)[-1]
    last = stages[last_name]
    row = {k: float(last[k]) for k, _, _ in COLUMNS if isinstance(last.get(k), int | float)}
    row.update(stability(run / "csv" / last_name / "metrics.csv", **target))
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


def _eval_data(run: Path) -> dict[str, Any] | None:
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


def win_vs_baseline(
    loaded: Sequence[tuple[Path, tuple[str, list[str]], dict[str, float]]], baseline: str
) -> None:
    """Adds `win_vs_baseline` to each non-baseline row, in place.

    A run's baseline is the `baseline`-experiment run with the same seed and test data whose
    overrides are the largest subset of the run's own (so a sweep that also ran the baseline
    under its own setting, e.g. harder negatives, is compared with that one). The judge is the
    pipeline's: ground-truth facts where the source knows them, else reference CIDEr.
    """
    data_of = {run: _eval_data(run) for run, _, _ in loaded}  # each config parsed once
    bases = [(run, set(ov), row) for run, (name, ov), row in loaded if name == baseline]
    data_cache: dict[str, tuple[Any, list[Any]] | str] = {}
    for run, (name, ov), row in loaded:
        if name == baseline:
            continue
        data = data_of[run]
        outputs = final_outputs(run)
        if data is None or outputs is None:
            continue
        match = sorted(
            (-len(b_ov), str(b_run), b_run)
            for b_run, b_ov, b_row in bases
            if b_row["seed"] == row["seed"] and b_ov <= set(ov) and data_of[b_run] == data
        )
        if not match:
            continue
        if len(match) > 1 and match[0][0] == match[1][0]:
            log.warning(
                "%s: several %s runs fit as its baseline; using %s", run, baseline, match[0][1]
            )
        base_outputs = final_outputs(match[0][2])
        if base_outputs is None or len(base_outputs) != len(outputs):
            continue
        key = json.dumps(data, sort_keys=True)
        if key not in data_cache:
            data_cache[key] = _test_records(data)
        if isinstance(data_cache[key], str):  # the data is not readable here: skip, said once
            continue
        source, records = data_cache[key]
        if len(records) != len(outputs):
            log.warning(
                "%s: %d saved test captions but its config gives %d records; no win-rate",
                run,
                len(outputs),
                len(records),
            )
            continue
        row["win_vs_baseline"] = win_rate(source, records, outputs, base_outputs)[
            "winrate/win_rate"
        ]


def _test_records(data: dict[str, Any]) -> tuple[Any, list[Any]] | str:
    """(source, test records) of a run's config, or why they cannot be read on this machine."""
    try:
        source = hydra.utils.instantiate(data["source"])
        return source, source.captions(data["split"])[: data["n_records"]]
    except Exception as err:  # e.g. a cluster's COCO path: the report still runs without it
        log.warning("win vs baseline skipped for data %s: %s", data["source"].get("_target_"), err)
        return f"{type(err).__name__}: {err}"


def load_all(
    runs: Sequence[Path],
    baseline: str | None = "sft_only",
    target: float = 0.9,
    target_key: str = "train/rewards/accuracies",
    selection: dict[str, set[str]] | None = None,
):
    """Rows of every run (win vs baseline added); with `selection`, only the val-selected setting
    of each selected experiment is kept."""
    loaded = [(r, *load_run(r, target=target, target_key=target_key)) for r in runs]
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


def aggregate(
    runs: Sequence[Path],
    baseline: str | None = "sft_only",
    target: float = 0.9,
    target_key: str = "train/rewards/accuracies",
    selection: dict[str, set[str]] | None = None,
) -> dict[str, dict[str, Any]]:
    loaded = load_all(runs, baseline, target, target_key, selection)
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
                if k != "steps_to_target" and len(vals) < len(rows):
                    stats[k].update(reached=len(vals), of=len(rows))
            if k == "steps_to_target" and present:  # runs that never reach it are not averaged
                stats[k] = {**stats.get(k, {}), "reached": len(vals), "of": len(present)}
        out[key] = stats
    return out


def group_rows(
    loaded: Sequence[tuple[Path, tuple[str, list[str]], dict[str, float]]],
) -> dict[str, list[dict[str, float]]]:
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


def paired_markdown(rows: Sequence[dict[str, Any]]) -> str:
    headers = {k: h for k, h, _ in COLUMNS}
    lines = [
        "| A − B | metric | seeds | per-seed A − B | mean | bootstrap 95% CI | A > B |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["seeds"]:  # e.g. displacement vs a run without π_ref
            lines.append(
                f"| {r['a']} − {r['b']} | {headers.get(r['metric'], r['metric'])} | 0 | – | – | – | – |"
            )
            continue
        per = ", ".join(f"{x:+.3g}" for x in r["diffs"])
        lines.append(
            f"| {r['a']} − {r['b']} | {headers.get(r['metric'], r['metric'])} | {len(r['seeds'])} | "
            f"{per} | {r['mean']:+.3g} | [{r['ci95'][0]:+.3g}, {r['ci95'][1]:+.3g}] | "
            f"{r['wins']}/{len(r['seeds'])} |"
        )
    return "\n".join(lines) + "\n"


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


def markdown(agg: dict[str, dict[str, Any]], baseline: str | None = None) -> str:
    cols = [(k, h) for k, h, _ in COLUMNS if any(k in g for g in agg.values())]
    lines = [
        "| setting | n | " + " | ".join(h for _, h in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for key, g in agg.items():
        cells = [_cell(g.get(k)) for k, _ in cols]
        lines.append(f"| {key} | {g['n']} | " + " | ".join(cells) + " |")
    notes = []
    if baseline and any("win_vs_baseline" in g for g in agg.values()):
        notes.append(
            f"win vs baseline: win-rate of the final test captions against the `{baseline}` "
            "run of the same seed and test data (ties count half)."
        )
    if any("of" in v for g in agg.values() for v in g.values() if isinstance(v, dict)):
        notes.append(
            "(k/n): the mean is over the k of n runs that gave a value; for steps→target, "
            "the runs that reached the target."
        )
    return "\n".join(lines) + "\n" + "".join(f"\n{n}\n" for n in notes)


def _cell(stat: dict[str, Any] | None) -> str:
    if not stat or "mean" not in stat:
        return f"– (0/{stat['of']})" if stat and "of" in stat else "–"
    text = f"{stat['mean']:.3g} ± {stat['std']:.2g}"
    return text + (f" ({stat['reached']}/{stat['of']})" if "of" in stat else "")


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
    headers = {k: h for k, h, _ in COLUMNS}
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
            ax.set_title(f"{title.split(' ')[0]}: {headers[k]}", fontsize=9)
    fig.tight_layout()
    path = out_dir / "report_sweeps.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m cwdpo.report", description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="run or multirun directories (searched recursively)")
    ap.add_argument("--out", default=None, help="output directory (default: the first dir)")
    ap.add_argument(
        "--baseline",
        default="sft_only",
        help="experiment the 'win vs baseline' column compares with ('' for none)",
    )
    ap.add_argument(
        "--target-key",
        default="train/rewards/accuracies",
        help="logged metric for steps→target (any column of the stage's metrics.csv)",
    )
    ap.add_argument("--target", type=float, default=0.9, help="value its rolling mean must reach")
    ap.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="A:B",
        help="paired per-seed differences A − B with bootstrap 95%% CIs (repeatable)",
    )
    ap.add_argument(
        "--metric",
        action="append",
        default=[],
        help=f"metric(s) for --compare and --select (default: the primary, {PRIMARY})",
    )
    ap.add_argument(
        "--select",
        default=None,
        metavar="VAL_DIR",
        help="runs evaluated on val (eval.split=val): keep, per experiment, only the "
        "setting best there on the first --metric (tuning never sees test)",
    )
    ap.add_argument("--n-boot", type=int, default=10_000)
    args = ap.parse_args(argv)
    runs = find_runs(args.dirs)
    metrics = args.metric or [PRIMARY]
    selection = select_on_val(find_runs([args.select]), metrics[0]) if args.select else None
    loaded = load_all(runs, args.baseline or None, args.target, args.target_key, selection)
    agg = aggregate(
        runs,
        baseline=args.baseline or None,
        target=args.target,
        target_key=args.target_key,
        selection=selection,
    )
    out = Path(args.out or args.dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(agg, args.baseline or None)
    if selection:
        table += (
            "\nSelected on val ("
            + metrics[0]
            + "): "
            + "; ".join(
                f"{k}: {' '.join(sorted(v)) or 'defaults'}" for k, v in sorted(selection.items())
            )
            + "\n"
        )
    if args.compare:
        groups = group_rows(loaded)
        rows: list[dict[str, Any]] = []
        skipped: list[str] = []
        for spec in args.compare:
            if ":" not in spec:
                raise SystemExit(f"--compare expects A:B (two setting names), got {spec!r}")
            a, b = spec.split(":", 1)
            try:
                rows += [paired_differences(groups, a, b, m, args.n_boot) for m in metrics]
            except KeyError as err:  # e.g. the control ran fewer methods: say so, go on
                skipped.append(str(err.args[0]))
        table += "\n" + paired_markdown(rows) + "".join(f"\nskipped: {s}\n" for s in skipped)
    atomic_write_text(out / "report.md", table)
    atomic_write_json(out / "report.json", {**agg, **({"paired": rows} if args.compare else {})})
    plot(agg, out)
    print(table)
    return table


if __name__ == "__main__":
    main()
