"""The mean cooling weight w_c over CW-DPO runs: the constant loser weight of `dpo_matched`.

Per run, the mean of `train/cooling/mean` over its stage-2 steps; then the mean over runs.
    python experiments/testbed/mean_wc.py experiments/testbed/runs/<name>/seed*/cw_dpo
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def mean_wc(runs: list[Path]) -> float:
    if not runs:
        raise SystemExit("mean_wc.py: no CW-DPO run directories given")
    vals = [
        pd.read_csv(r / "csv" / "cw_dpo" / "metrics.csv")["train/cooling/mean"].dropna().mean()
        for r in runs
    ]
    return sum(vals) / len(vals)


if __name__ == "__main__":
    print(f"{mean_wc([Path(p) for p in sys.argv[1:]]):.3f}")
