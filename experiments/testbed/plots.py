"""The study's figures (issue 17), drawn from the committed reports and the run directories.

    python experiments/testbed/plots.py --out experiments/testbed/figures \
        --report experiments/testbed/cooc_c0.12_tuned/report.json \
        --tune experiments/testbed/runs/cooc_c0.12-tune \
        --curves experiments/testbed/runs/cooc_c0.12_curves \
        --h-report 0=experiments/testbed/cooc_c0.12_h0/report.json \
        --h-report 0.15=experiments/testbed/cooc_c0.12/report.json \
        --h-report 0.3=experiments/testbed/cooc_c0.12_h0.3/report.json

Figures: paired.png (per-seed paired differences with bootstrap CIs, from report.json),
tuning.png (val F1 against each tuned knob, mean over the tuning seeds), heldout.png (held-out
val curves, mean ± std over seeds, from each run's heldout.csv) and companion.png (companion
hallucination against the annotators' rate h).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts
from select_on_val import select  # noqa: E402

LABELS = {  # setting name (experiment + overrides) → a short label
    "cw_dpo": "CW-DPO",
    "ablation_cooling": "DPO",
    "sft_continue": "SFT cont.",
    "sft_only": "SFT-C",
    "chosen_only": "chosen-only",
    "rft": "RFT",
    "dpo_matched": "DPO, w ≡ mean w_c",
    "cw_dpo_shuffled": "CW-DPO, w_c shuffled",
    "rpo": "RPO",
    "ipo": "IPO",
    "ablation_smooth_sft": "CW-DPO after plain SFT",
}
METRIC_NAMES = {"f1": "F1 points", "companion_halluc": "companion halluc., points"}


RUN_DIR = re.compile(r"(.+?)(?:_(lr|beta)([0-9.e+-]+))?")  # <method>[_lr<v>|_beta<v>]
KNOB_NAMES = {"lr": "lr", "beta": "β"}


def parse_run_dir(name: str) -> tuple[str, str | None, str | None]:
    """(method, tuned knob, its value) of a run directory's name."""
    m = RUN_DIR.fullmatch(name)
    return (m[1], m[2], m[3]) if m else (name, None, None)


def dir_label(name: str) -> str:
    method, knob, value = parse_run_dir(name)
    return LABELS.get(method, method) + (f", {KNOB_NAMES[knob]} {value}" if knob else "")


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def label(setting: str) -> str:
    exp, *over = setting.split()
    text = LABELS.get(exp, exp)
    for o in over:
        if o.startswith("stage.cw_dpo.optimizer.lr="):
            text += f", lr {o.split('=')[1]}"
        elif o.startswith(("stage.cw_dpo.objective.beta=", "stage.cw_dpo.beta=")):  # new, old runs
            text += f", β {o.split('=')[1]}"
        elif o.startswith("negatives.easy_mix="):
            text += f", easy {o.split('=')[1]}"
        elif o.startswith("negatives.dataset_fraction="):
            text += f", mixed {o.split('=')[1]}"
        elif o == "negatives=self_judged":
            text += ", best-vs-worst pairs"
        elif o.startswith("stage_seed_offset="):
            text += " (A/A rerun)"
        elif o.startswith("stage.sft_c.objective.lam="):
            text += " (plain SFT)"
    return text


def paired(report: Path, out: Path) -> Path:
    rows = [r for r in json.loads(report.read_text()).get("paired", []) if r["seeds"]]
    metrics = list(dict.fromkeys(r["metric"] for r in rows if r["metric"] in METRIC_NAMES))
    n = max(sum(r["metric"] == m for r in rows) for m in metrics)
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 0.42 * n + 1.4))
    for ax, metric in zip(np.atleast_1d(axes), metrics):
        sel = [r for r in rows if r["metric"] == metric]
        for i, r in enumerate(sel):
            lo, hi = r.get("t_ci95", r["ci95"])  # reports before issue 28: bootstrap only
            ax.plot([lo, hi], [i, i], color="tab:blue", lw=2)
            ax.plot(r["mean"], i, "o", color="tab:blue")
            ax.plot(r["diffs"], [i + 0.18] * len(r["diffs"]), ".", color="0.55", ms=4)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(sel)), [f"{label(r['a'])} − {label(r['b'])}" for r in sel])
        ax.invert_yaxis()
        ax.set_xlabel(f"A − B, {METRIC_NAMES[metric]}")
    kind = "t" if all("t_ci95" in r for r in rows) else "bootstrap"
    fig.suptitle(f"Paired by seed: mean and {kind} 95% CI (grey dots: the seeds)", fontsize=10)
    return save(fig, out / "paired.png")


def tuning(tune: Path, out: Path) -> Path:
    by: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for res in tune.glob("seed*/*/results.json"):
        method, knob, value = parse_run_dir(res.parent.name)
        if knob:
            f1 = json.loads(res.read_text())["stages"]["cw_dpo"]["f1"]
            by[(knob, method)][float(value)].append(f1)
    knobs = sorted({k for k, _ in by})
    fig, axes = plt.subplots(1, len(knobs), figsize=(5 * len(knobs), 3.6), squeeze=False)
    for ax, knob in zip(axes[0], knobs):
        for (k, method), vals in sorted(by.items()):
            if k != knob:
                continue
            xs = sorted(vals)
            ys = [mean(vals[x]) for x in xs]
            ax.plot(xs, ys, "o-", label=LABELS.get(method, method))
            best = float(select(tune, method, knob, "f1")[0])  # the rule the studies ran
            ax.plot(best, mean(vals[best]), "*", ms=14, color=ax.lines[-1].get_color())
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel({"lr": "stage-2 learning rate", "beta": "β"}[knob])
        ax.set_ylabel("val F1 % (mean of tuning seeds)")
        ax.legend(fontsize=8)
    fig.suptitle("Tuning on val (★ = selected)")
    return save(fig, out / "tuning.png")


def read_curve(path: Path) -> dict[int, dict[str, float]]:
    with path.open(newline="") as f:
        return {
            int(r["step"]): {k: float(v) for k, v in r.items() if v and k not in ("stage", "split")}
            for r in csv.DictReader(f)
            if r["stage"] == "cw_dpo"
        }


CURVE_METHODS = ("cw_dpo", "ablation_cooling", "sft_continue", "chosen_only", "rft", "ipo")


def heldout(curves: Path, out: Path) -> Path:
    """Mean over seeds of each main method's held-out curve (run dirs `<method>[_lr<v>|_beta<v>]`;
    controls such as `cw_dpo_shuffled_lr…` are left out, and of IPO the largest β evaluated)."""
    by: dict[str, list[dict[int, dict[str, float]]]] = defaultdict(list)
    for p in sorted(curves.glob("seed*/*/heldout.csv")):
        if parse_run_dir(p.parent.name)[0] in CURVE_METHODS:
            by[p.parent.name].append(read_curve(p))
    ipo = sorted(
        (n for n in by if n.startswith("ipo_beta")), key=lambda n: float(parse_run_dir(n)[2])
    )
    for n in ipo[:-1]:
        del by[n]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, runs in sorted(by.items()):
        steps = sorted(set.intersection(*(set(r) for r in runs)))
        text = dir_label(name)
        for ax, key in zip(axes, ("f1", "companion_halluc")):
            delta = np.array([[r[s][key] - r[0][key] for s in steps] for r in runs])
            ax.plot(steps, delta.mean(0), "o-", ms=3, label=f"{text} (n={len(runs)})")
    axes[0].set_ylabel("val F1 − start, points")
    axes[1].set_ylabel("val companion halluc. − start, points")
    for ax in axes:
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("stage-2 step")
    axes[0].axhline(1.0, color="k", lw=0.8, ls="--")  # the common target: start + 1 point
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("Held-out curves (64 val images, greedy; mean over seeds; dashed: the +1 target)")
    return save(fig, out / "heldout.png")


def companion(h_reports: list[tuple[float, Path]], out: Path) -> Path:
    keep = ("sft_only", "sft_continue", "cw_dpo", "ablation_cooling")
    series: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for h, report in sorted(h_reports):
        for setting, stats in json.loads(report.read_text()).items():
            exp = setting.split()[0]
            if setting == "paired" or exp not in keep or "companion_halluc" not in stats:
                continue
            if set(setting.split()[1:]) - {"negatives=self_judged"}:  # default settings only
                continue
            s = stats["companion_halluc"]
            series[exp].append((h, s["mean"], s["std"]))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, exp in enumerate(keep):
        if exp in series:
            h, m, s = zip(*series[exp])
            ax.errorbar(
                np.array(h) + 0.004 * (i - 1.5), m, s, fmt="o-", capsize=3, label=LABELS[exp]
            )
    ax.set_xlabel("annotators' hallucination rate h")
    ax.set_ylabel("test companion hallucination % (± std, 5 seeds)")
    ax.legend(fontsize=8)
    return save(fig, out / "companion.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--report", type=Path, help="report.json with paired rows")
    ap.add_argument("--tune", type=Path, help="tuning runs (<method>_lr<v> / _beta<v> dirs)")
    ap.add_argument("--curves", type=Path, help="runs with heldout.csv")
    ap.add_argument("--h-report", action="append", default=[], metavar="H=REPORT_JSON")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    made = []
    if args.report:
        made.append(paired(args.report, args.out))
    if args.tune:
        made.append(tuning(args.tune, args.out))
    if args.curves:
        made.append(heldout(args.curves, args.out))
    if args.h_report:
        pairs = [(float(h), Path(p)) for h, p in (x.split("=", 1) for x in args.h_report)]
        made.append(companion(pairs, args.out))
    print("\n".join(map(str, made)))


if __name__ == "__main__":
    main()
