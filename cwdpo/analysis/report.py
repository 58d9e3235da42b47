"""The report over a set of finished runs: report.md (+ paired differences), report.json and
the report's plots, as `python -m cwdpo.report` writes them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cwdpo.analysis.report_plots import plot
from cwdpo.analysis.runs import find_runs
from cwdpo.analysis.stats import aggregate_loaded, compare, load_all, select_on_val
from cwdpo.analysis.tables import PRIMARY, markdown, paired_markdown, selection_note
from cwdpo.utils.io import atomic_write_json, atomic_write_text


def write_report(
    dirs: Sequence[str | Path],
    out: str | Path | None = None,
    baseline: str | None = "sft_only",
    target: float = 0.9,
    target_key: str = "train/rewards/accuracies",
    comparisons: Sequence[str] = (),
    metrics: Sequence[str] = (),
    select: str | Path | None = None,
    n_boot: int = 10_000,
    heldout_gain: float = 1.0,
) -> str:
    """Aggregate the runs below `dirs` into `out` (default: the first dir); returns report.md.

    `comparisons`: `A:B` settings for paired per-seed differences on `metrics` (default the
    primary), with t-interval, t / Holm / sign-flip p, MDE and caption-level McNemar
    (`cwdpo.analysis.stats.compare`); `select`: val runs whose best setting per experiment (on the first metric) is the
    only one kept; `heldout_gain`: the held-out curve's target, start + gain."""
    runs = find_runs(dirs)
    metrics = list(metrics) or [PRIMARY]
    selection = select_on_val(find_runs([select]), metrics[0]) if select else None
    loaded = load_all(runs, baseline, target, target_key, selection, heldout_gain)
    agg = aggregate_loaded(loaded)
    out = Path(out or dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(agg, baseline)
    if any("heldout_gain_final" in g for g in agg.values()):
        table += (
            f"\nsteps→val target: first held-out evaluation (`heldout.csv`) at least {heldout_gain:g} "
            f"above the stage start on {PRIMARY} (else the judge score); val gain: final − start; "
            "val jitter: mean |change| between consecutive held-out evaluations.\n"
        )
    if selection:
        table += selection_note(metrics[0], selection)
    extra: dict[str, Any] = {}
    if comparisons:
        rows, skipped = compare(loaded, comparisons, metrics, n_boot)
        table += "\n" + paired_markdown(rows) + "".join(f"\nskipped: {s}\n" for s in skipped)
        extra["paired"] = rows
    atomic_write_text(out / "report.md", table)
    atomic_write_json(out / "report.json", {**agg, **extra})
    plot(agg, out)
    return table
