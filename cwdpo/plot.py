"""Local plots of the learning dynamics, read from run directories (never from W&B).

Every pipeline run writes `<run>/plots/*.png` (Δlogp curves, next-token distribution drift,
CW-DPO dynamics). To compare runs — e.g. DPO vs CW-DPO, or every job of a Hydra multirun:

    python -m cwdpo.plot logs/train/runs/dpo/<time> logs/train/runs/cw_dpo/<time> --out cmp/
    python -m cwdpo.plot logs/train/multiruns/ablation/<time>          # all jobs inside

A path is a run if it holds `probes.csv` or `dynamics.csv`; otherwise it is searched for runs.
One run → its own plots; several → overlays (`compare_*.png`).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cwdpo.utils.safe_log import FAILURES

log = logging.getLogger(__name__)

RUN_FILES = ("probes.csv", "dynamics.csv")
GROUP_COLOURS = {
    "positives": "tab:green",
    "gentle": "tab:orange",
    "easy": "tab:red",
    "on_policy": "tab:purple",
}


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
    given order (sorted below each). Not `report.find_runs`, which finds finished runs
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


# ---------------------------------------------------------------- drawing
def _subplots(nrows: int, ncols: int, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A pyplot-free Figure (Agg canvas): no global backend switch, safe inside notebooks."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _stage_lines(ax: Any, stages: list[dict[str, Any]]) -> None:
    for s in stages[1:]:
        ax.axvline(s["offset"], color="0.6", ls="--", lw=0.8)
    for s in stages:
        ax.text(
            s["offset"],
            1.0,
            f" {s['stage']}",
            transform=ax.get_xaxis_transform(),
            fontsize=7,
            va="top",
            color="0.35",
            clip_on=True,
        )


def _delta_cols(baseline: str) -> tuple[str, str, str]:
    return ("run_mean", "run_q10", "run_q90") if baseline == "run" else ("mean", "q10", "q90")


def _segments(df: pd.DataFrame, baseline: str):
    """Stage-relative curves restart at every stage: draw them per stage, not joined."""
    if baseline == "run":
        yield df
    else:
        for _, part in df.groupby("stage", sort=False):
            yield part


def plot_delta_logp(run: Run, ax: Any, baseline: str = "run", bands: bool = True) -> None:
    m, lo, hi = _delta_cols(baseline)
    df = run.probes
    for group, g in df.groupby("group", sort=False):
        colour = GROUP_COLOURS.get(group)
        for i, seg in enumerate(_segments(g.sort_values("run_step"), baseline)):
            ax.plot(
                seg.run_step,
                seg[m],
                marker="o",
                ms=2.5,
                color=colour,
                label=group if i == 0 else None,
            )
            if bands and lo in seg and hi in seg:
                ax.fill_between(seg.run_step, seg[lo], seg[hi], color=colour, alpha=0.15, lw=0)
    ax.axhline(0, color="k", lw=0.6)
    _stage_lines(ax, run.stages)
    ax.set_xlabel("run step")
    ax.set_ylabel(f"Δℓ̄ from the {baseline} start (nats/token)")
    ax.legend(fontsize=8)


def plot_run(run: Run, out_dir: str | Path | None = None) -> list[Path]:
    """This run's PNGs into `out_dir` (default `<run>/plots`); returns the written paths."""
    out = Path(out_dir) if out_dir else run.path / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        written.append(_save(fig, out / name))

    if run.probes is not None and len(run.probes):
        fig, (axes,) = _subplots(1, 3, figsize=(16, 4.2))
        plot_delta_logp(run, axes[0], "run")
        axes[0].set_title(f"{run.label}: Δℓ̄ (run-relative, mean and q10–q90)")
        plot_delta_logp(run, axes[1], "stage")
        axes[1].set_title("Δℓ̄ (stage-relative)")
        for group, g in run.probes.groupby("group", sort=False):
            axes[2].plot(
                g.run_step, g.ell, marker="o", ms=2.5, label=group, color=GROUP_COLOURS.get(group)
            )
        _stage_lines(axes[2], run.stages)
        axes[2].set_title("ℓ̄ (absolute)")
        axes[2].set_xlabel("run step")
        axes[2].legend(fontsize=8)
        save(fig, "delta_logp.png")

        cols = [c for c in ("entropy", "top1", "tv", "js") if c in run.probes]
        if cols:
            fig, axes = _subplots(1, len(cols), figsize=(4 * len(cols), 3.6))
            titles = {
                "entropy": "next-token entropy (nats)",
                "top1": "top-1 token probability",
                "tv": "TV from the stage start",
                "js": "JS from the stage start (nats)",
            }
            for ax, c in zip(axes[0], cols):
                for group, g in run.probes.groupby("group", sort=False):
                    for i, seg in enumerate(_segments(g, "stage")):
                        ax.plot(
                            seg.run_step,
                            seg[c],
                            marker="o",
                            ms=2.5,
                            color=GROUP_COLOURS.get(group),
                            label=group if i == 0 else None,
                        )
                _stage_lines(ax, run.stages)
                ax.set_title(titles[c])
                ax.set_xlabel("run step")
            axes[0][0].legend(fontsize=8)
            save(fig, "distributions.png")

    if run.dynamics is not None and len(run.dynamics):
        fig, (axes,) = _subplots(1, 4, figsize=(18, 3.8))
        if run.weights is not None and len(run.weights):
            w = run.weights
            axes[0].scatter(
                w.run_step,
                w.w,
                s=4,
                alpha=0.3,
                c=w["easy"].fillna(0) if "easy" in w else None,
                cmap="coolwarm",
            )
            means = w.groupby("run_step").w.mean()
            axes[0].plot(means.index, means.values, color="k", lw=1, label="batch mean")
            axes[0].set_ylim(-0.03, 1.03)
            axes[0].legend(fontsize=8)
        axes[0].set_title("cooling weights w_c (red: easy negatives)")
        v = run.metric("dynamics/vulnerable_frac")
        axes[1].plot(v.run_step, v.value)
        axes[1].set_ylim(-0.03, 1.03)
        axes[1].set_title("pairs in the vulnerable region a∈[0.8,0.99]")
        for name, lab in (("norm_w", "‖g_w‖"), ("norm_l", "‖g_l‖"), ("norm_total", "‖g‖")):
            d = run.metric(f"gradsplit/{name}")
            axes[2].plot(d.run_step, d.value, marker="o", ms=3, label=lab)
        axes[2].set_title("gradient split")
        axes[2].legend(fontsize=8)
        c = run.metric("gradsplit/cosine")
        axes[3].plot(c.run_step, c.value, marker="o", ms=3)
        axes[3].axhline(0, color="k", lw=0.6)
        axes[3].set_title("cos(g_w, g_l)")
        for ax in axes:
            ax.set_xlabel("run step")
        save(fig, "dynamics.png")
    return written


def write_run_plots(run_dir: str | Path) -> list[Path]:
    """The pipeline's end-of-run hook: plots never fail a run, they only warn."""
    try:
        run_dir = Path(run_dir)
        return plot_run(load_dynamics_run(run_dir)) if is_run(run_dir) else []
    except Exception as e:  # a plotting bug must not lose a finished run
        FAILURES.record(f"plots of {run_dir}", e)
        return []


def plot_compare(runs: Sequence[Run], out_dir: str | Path, baseline: str = "run") -> list[Path]:
    """Overlay several runs: Δℓ̄ per probe group, and the CW-DPO dynamics side by side."""
    import matplotlib

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    m, lo, hi = _delta_cols(baseline)
    with_probes = [r for r in runs if r.probes is not None and len(r.probes)]
    groups = list(dict.fromkeys(g for r in with_probes for g in r.probes.group))
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    if groups:
        fig, axes = _subplots(1, len(groups), figsize=(4.6 * len(groups), 3.8))
        for ax, group in zip(axes[0], groups):
            for k, r in enumerate(with_probes):
                g = r.probes[r.probes.group == group].sort_values("run_step")
                for i, seg in enumerate(_segments(g, baseline)):
                    ax.plot(
                        seg.run_step,
                        seg[m],
                        color=colours[k % len(colours)],
                        marker="o",
                        ms=2.5,
                        label=r.label if i == 0 else None,
                    )
                    ax.fill_between(
                        seg.run_step,
                        seg[lo],
                        seg[hi],
                        alpha=0.12,
                        lw=0,
                        color=colours[k % len(colours)],
                    )
            if with_probes:
                _stage_lines(ax, with_probes[0].stages)
            ax.axhline(0, color="k", lw=0.6)
            ax.set_title(f"{group}: Δℓ̄ ({baseline}-relative)")
            ax.set_xlabel("run step")
        axes[0][0].legend(fontsize=8)
        written.append(_save(fig, out / "compare_delta_logp.png"))
    panels = [
        ("dynamics/cooling/mean", "mean cooling weight"),
        ("dynamics/vulnerable_frac", "vulnerable-region fraction"),
        ("gradsplit/norm_l", "‖g_l‖ (rejected)"),
        ("gradsplit/cosine", "cos(g_w, g_l)"),
    ]
    with_dyn = [r for r in runs if r.dynamics is not None and len(r.dynamics)]
    if with_dyn:
        fig, (axes,) = _subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6))
        for ax, (name, title) in zip(axes, panels):
            for k, r in enumerate(with_dyn):
                d = r.metric(name)
                ax.plot(
                    d.run_step,
                    d.value,
                    color=colours[k % len(colours)],
                    label=r.label,
                    marker="o" if name.startswith("gradsplit") else None,
                    ms=3,
                )
            ax.set_title(title)
            ax.set_xlabel("run step")
        axes[0].legend(fontsize=8)
        written.append(_save(fig, out / "compare_dynamics.png"))
    return written


def main(argv: Sequence[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(
        prog="python -m cwdpo.plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("paths", nargs="+", help="run directories or directories holding runs")
    ap.add_argument("--out", help="output directory (default: <run>/plots, or <first path>/plots)")
    ap.add_argument("--labels", nargs="*", help="legend labels, one per run found")
    ap.add_argument(
        "--baseline",
        choices=("run", "stage"),
        default="run",
        help="Δℓ̄ from the run's first stage start, or from each stage's start",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = load_runs(args.paths, args.labels)
    if not runs:
        raise SystemExit(f"no runs found in {args.paths}")
    if len(runs) == 1:
        written = plot_run(runs[0], args.out)
    else:
        out = Path(args.out) if args.out else Path(args.paths[0]) / "plots"
        written = plot_compare(runs, out, args.baseline)
    for p in written:
        print(p)
    return written


if __name__ == "__main__":
    main()
