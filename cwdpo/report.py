"""`python -m cwdpo.report <multirun dir> [...]`: aggregate runs into a markdown table + plots.

Runs are grouped by experiment and their Hydra overrides minus `seed`; every number is
mean ± std over the seeds of a group. Final metrics come from each run's results.json (last
stage); stability and steps-to-target from the last stage's metrics CSV, steps to a common
held-out target from its held-out curve (heldout.csv); the win-rate against a
baseline experiment (default `sft_only`) re-judges each run's saved test captions against the
baseline run of the same seed and test data (a sweep that also ran the baseline under its own
setting is compared with that one). A value a run cannot give is left out and counted: "(k/n)".
`--compare A:B` adds paired per-seed differences with small-sample inference for n ≈ 5 seeds
(t-interval, t-test, Holm across the table, sign-flip test, MDE; `cwdpo.analysis.inference`).
The work is done in `cwdpo.analysis` (`cwdpo.analysis.report.write_report`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cwdpo.analysis.report import write_report
from cwdpo.analysis.tables import PRIMARY


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
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
        "--heldout-gain",
        type=float,
        default=1.0,
        help="steps→val target: first held-out curve point (heldout.csv) this far above the "
        "stage start on the primary metric",
    )
    ap.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="A:B",
        help="paired per-seed differences A − B on every --metric, for any two settings: mean, "
        "t 95%% CI, paired t-test p, Holm p (over every row of the table), exact sign-flip p, "
        "MDE at 80%% power, wins; caption-level exact McNemar for per-caption rates "
        "(companion_halluc, chair_s, malformed) where the runs' saved captions are readable; "
        "bootstrap CIs in report.json (repeatable)",
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
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    table = write_report(
        args.dirs,
        args.out,
        baseline=args.baseline or None,
        target=args.target,
        target_key=args.target_key,
        comparisons=args.compare,
        metrics=args.metric,
        select=args.select,
        n_boot=args.n_boot,
        heldout_gain=args.heldout_gain,
    )
    print(table)
    return table


def cli() -> None:
    """The `cwdpo-report` console script: the report, exit status 0 on success (a script's return
    value would be taken as the exit status)."""
    main()


if __name__ == "__main__":
    main()
