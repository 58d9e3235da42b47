"""Plots of a run's learning dynamics (Δlogp curves, next-token distribution drift, CW-DPO
dynamics) and overlays of several runs, drawn on pyplot-free Figures.

matplotlib is imported inside the drawing calls only, so the training pipeline can hold its
end-of-run hook (`write_run_plots`) without loading matplotlib until it plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cwdpo.analysis.dynamics import Run, is_run, load_dynamics_run
from cwdpo.utils.safe_log import FAILURES

GROUP_COLOURS = {
    "positives": "tab:green",
    "gentle": "tab:orange",
    "easy": "tab:red",
    "on_policy": "tab:purple",
}


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
    written: list[Path] = []  # each figure saved as soon as it is drawn
    if run.probes is not None and len(run.probes):
        written.append(_save(_delta_logp_figure(run), out / "delta_logp.png"))
        cols = [c for c in ("entropy", "top1", "tv", "js") if c in run.probes]
        if cols:
            written.append(_save(_distributions_figure(run, cols), out / "distributions.png"))
    if run.dynamics is not None and len(run.dynamics):
        written.append(_save(_dynamics_figure(run), out / "dynamics.png"))
    return written


def _delta_logp_figure(run: Run) -> Any:
    """Δℓ̄ run- and stage-relative, and ℓ̄ itself, per probe group."""
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
    return fig


DISTRIBUTION_TITLES = {
    "entropy": "next-token entropy (nats)",
    "top1": "top-1 token probability",
    "tv": "TV from the stage start",
    "js": "JS from the stage start (nats)",
}


def _distributions_figure(run: Run, cols: Sequence[str]) -> Any:
    """Next-token distribution drift per probe group: one panel per column of probes.csv."""
    fig, axes = _subplots(1, len(cols), figsize=(4 * len(cols), 3.6))
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
        ax.set_title(DISTRIBUTION_TITLES[c])
        ax.set_xlabel("run step")
    axes[0][0].legend(fontsize=8)
    return fig


def _dynamics_figure(run: Run) -> Any:
    """Cooling weights, the vulnerable-region fraction and the gradient split of CW-DPO."""
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
    return fig


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
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    with_probes = [r for r in runs if r.probes is not None and len(r.probes)]
    groups = list(dict.fromkeys(g for r in with_probes for g in r.probes.group))
    if groups:
        fig = _compare_delta_figure(with_probes, groups, baseline, colours)
        written.append(_save(fig, out / "compare_delta_logp.png"))
    with_dyn = [r for r in runs if r.dynamics is not None and len(r.dynamics)]
    if with_dyn:
        written.append(
            _save(_compare_dynamics_figure(with_dyn, colours), out / "compare_dynamics.png")
        )
    return written


def _compare_delta_figure(
    with_probes: Sequence[Run], groups: Sequence[str], baseline: str, colours: Sequence[str]
) -> Any:
    """One panel per probe group: every run's Δℓ̄ (mean, q10–q90 band)."""
    m, lo, hi = _delta_cols(baseline)
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
    return fig


COMPARE_PANELS = (
    ("dynamics/cooling/mean", "mean cooling weight"),
    ("dynamics/vulnerable_frac", "vulnerable-region fraction"),
    ("gradsplit/norm_l", "‖g_l‖ (rejected)"),
    ("gradsplit/cosine", "cos(g_w, g_l)"),
)


def _compare_dynamics_figure(with_dyn: Sequence[Run], colours: Sequence[str]) -> Any:
    """The CW-DPO dynamics of every run, one panel per `COMPARE_PANELS` metric."""
    fig, (axes,) = _subplots(1, len(COMPARE_PANELS), figsize=(4.6 * len(COMPARE_PANELS), 3.6))
    for ax, (name, title) in zip(axes, COMPARE_PANELS):
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
    return fig
