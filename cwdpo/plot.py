"""Local plots of the learning dynamics, read from run directories (never from W&B).

Every pipeline run writes `<run>/plots/*.png` (Δlogp curves, next-token distribution drift,
CW-DPO dynamics). To compare runs — e.g. DPO vs CW-DPO, or every job of a Hydra multirun:

    python -m cwdpo.plot logs/train/runs/dpo/<time> logs/train/runs/cw_dpo/<time> --out cmp/
    python -m cwdpo.plot logs/train/multiruns/ablation/<time>          # all jobs inside

A path is a run if it holds `probes.csv` or `dynamics.csv`; otherwise it is searched for runs.
One run → its own plots; several → overlays (`compare_*.png`).
"""
# A thin CLI (its --help is this docstring): the readers are in cwdpo.analysis.dynamics, the
# drawing in cwdpo.analysis.dynamics_plots.

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from cwdpo.analysis.dynamics import load_runs
from cwdpo.analysis.dynamics_plots import plot_compare, plot_run


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


def cli() -> None:
    """The `cwdpo-plot` console script: the plots, exit status 0 on success (a script's return
    value would be taken as the exit status)."""
    main()


if __name__ == "__main__":
    main()
