"""The value of a tuned knob that each method's val runs select: one rule for every study script.

Tuning runs live at `TUNE/seed<s>/<method>_<tag><value>/results.json` (evaluated with
eval.split=val). A value's score is the mean over the tuning seeds of the selection metric of
stage `cw_dpo`; the rule picks the best, breaking ties by the next metric:

- `f1`: highest val F1 (issue 17's rule, tune.sh);
- `companion_halluc`: lowest val companion hallucination, then highest F1 (the planted-error
  study's primary metric, study_primary_lr.sh);
- `fact_accuracy`: highest facts % (the default job, experiments/shapes/default_job.sh).

Prints `method=value ...` on stdout and each method's table of means on stderr:

    python experiments/testbed/select_on_val.py TUNE TAG RULE METHOD [METHOD ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import mean

#: rule → (metric, +1 higher is better | -1 lower is better), in tie-break order
RULES: dict[str, tuple[tuple[str, int], ...]] = {
    "f1": (("f1", 1),),
    "companion_halluc": (("companion_halluc", -1), ("f1", 1)),
    "fact_accuracy": (("fact_accuracy", 1),),
}


def val_means(tune: Path, method: str, tag: str, metrics: list[str]) -> dict[str, list[float]]:
    """value (as spelled in the run dir) → the mean over tuning seeds of each metric."""
    runs: dict[str, list[dict[str, float]]] = {}
    prefix = f"{method}_{tag}"
    for res in sorted(tune.glob(f"seed*/{prefix}*/results.json")):
        stage = json.loads(res.read_text())["stages"]["cw_dpo"]
        runs.setdefault(res.parent.name[len(prefix) :], []).append(stage)
    if not runs:
        raise SystemExit(f"select_on_val.py: no {prefix}<value> runs under {tune}")
    return {v: [mean(r[k] for r in rs) for k in metrics] for v, rs in runs.items()}


def select(tune: Path, method: str, tag: str, rule: str) -> tuple[str, dict[str, list[float]]]:
    """The selected value of `method`'s knob under `rule`, and every value's metric means."""
    metrics, signs = zip(*RULES[rule], strict=True)
    means = val_means(tune, method, tag, list(metrics))
    best = max(means, key=lambda v: tuple(s * m for s, m in zip(signs, means[v], strict=True)))
    return best, means


def main(argv: list[str]) -> None:
    tune, tag, rule, methods = Path(argv[0]), argv[1], argv[2], argv[3:]
    if rule not in RULES or not methods:
        raise SystemExit(f"usage: select_on_val.py TUNE TAG {{{'|'.join(RULES)}}} METHOD ...")
    picks = []
    for m in methods:
        best, means = select(tune, m, tag, rule)
        picks.append(f"{m}={best}")
        names = "/".join(k for k, _ in RULES[rule])
        table = {v: tuple(round(x, 2) for x in means[v]) for v in sorted(means, key=float)}
        table = {v: t[0] if len(t) == 1 else t for v, t in table.items()}
        print(f"{m}: val {names} by {tag} {table} -> {best}", file=sys.stderr)
    print(" ".join(picks))


if __name__ == "__main__":
    main(sys.argv[1:])
