"""The default job's tuning and seed table (experiments/shapes/default_job.sh) as markdown.

python experiments/shapes/default_job.py experiments/shapes/runs/default_job
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import mean, stdev

KEYS = (("fact_accuracy", "facts %"), ("malformed", "malformed %"), ("f1", "F1 %"))


def stages(run: Path) -> dict[str, dict[str, float]]:
    return json.loads((run / "results.json").read_text())["stages"]


def table(out: Path) -> str:
    lines = ["Stage-2 lr on val (256 images; mean of tuning seeds 30, 31):", ""]
    lines += ["| lr | val facts % | per seed | val malformed % |", "|---|---|---|---|"]
    by: dict[float, list[dict[str, float]]] = {}
    for r in sorted((out / "tune").glob("seed*/cw_dpo_lr*/results.json")):
        by.setdefault(float(r.parent.name[len("cw_dpo_lr") :]), []).append(
            stages(r.parent)["cw_dpo"]
        )
    for lr, rows in sorted(by.items()):
        facts = [x["fact_accuracy"] for x in rows]
        lines.append(
            f"| {lr:g} | {mean(facts):.2f} | {', '.join(f'{x:.2f}' for x in facts)} | "
            f"{mean(x.get('malformed', float('nan')) for x in rows):.1f} |"
        )
    runs = sorted(out.glob("seed*/results.json"))
    lines += ["", "The default job (`python -m cwdpo.train seed=<s>`), test split:", ""]
    head = " | ".join(f"{label} SFT-C → CW-DPO" for _, label in KEYS)
    lines += [f"| seed | {head} |", "|---|" + "---|" * len(KEYS)]
    per: dict[str, list[tuple[float, float]]] = {k: [] for k, _ in KEYS}
    for r in runs:
        st = stages(r.parent)
        cells = []
        for k, _ in KEYS:
            a, b = st["sft_c"].get(k, float("nan")), st["cw_dpo"].get(k, float("nan"))
            per[k].append((a, b))
            cells.append(f"{a:.1f} → {b:.1f}")
        lines.append(f"| {r.parent.name[4:]} | " + " | ".join(cells) + " |")
    if len(runs) > 1:
        cells = []
        for k, _ in KEYS:
            a, b = [x for x, _ in per[k]], [y for _, y in per[k]]
            d = [y - x for x, y in per[k]]
            cells.append(
                f"{mean(a):.1f} ± {stdev(a):.1f} → {mean(b):.1f} ± {stdev(b):.1f} "
                f"(Δ {mean(d):+.2f} ± {stdev(d):.2f}, up on {sum(x > 0 for x in d)}/{len(d)})"
            )
        lines.append("| mean ± std | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table(Path(sys.argv[1])))
