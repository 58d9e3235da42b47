"""The val tuning tables of a study (the runs tune.sh evaluated with eval.split=val), as markdown.

Per method and value of the tuned knob: mean val F1 and mean val companion hallucination over the
tuning seeds (each seed's own value in brackets), the start's val F1 (step 0 of the held-out
curves), and the value the selection rule (highest mean val F1) picks. The numbers the README cites come from here.

    python experiments/testbed/tuning_table.py experiments/testbed/runs/cooc28-tune > tuning.md
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts
from select_on_val import select  # noqa: E402

KNOB = re.compile(r"^(?P<method>.+)_(?P<tag>lr|beta)(?P<value>[0-9.e+-]+)$")


def final(results: Path) -> dict[str, float]:
    """The last stage's metrics of a run."""
    stages = json.loads(results.read_text())["stages"]
    return stages[list(stages)[-1]]


def tables(tune: Path) -> str:
    by: dict[tuple[str, str], dict[float, dict[int, dict[str, float]]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for res in sorted(tune.glob("seed*/*/results.json")):
        seed, name = int(res.parent.parent.name[4:]), res.parent.name
        m = KNOB.match(name)
        if m:
            by[(m["method"], m["tag"])][float(m["value"])][seed] = final(res)
    if not by:
        raise SystemExit(f"tuning_table.py: no <method>_lr<value> runs under {tune}")
    out = ["Val scores of the tuning runs (mean over the tuning seeds; per seed in brackets).\n"]
    start_f1: dict[str, dict[int, float]] = defaultdict(dict)  # method → seed → step-0 val F1
    for curve in sorted(tune.glob("seed*/*/heldout.csv")):
        m = KNOB.match(curve.parent.name)
        with curve.open() as f:
            first = next(csv.DictReader(f), None)
        if m and first and int(first["step"]) == 0:
            start_f1[m["method"]][int(curve.parent.parent.name[4:])] = float(first["f1"])
    for (method, tag), values in sorted(by.items()):
        out += [
            "",
            f"**{method}** ({tag}); its start's val F1 (held-out curve, step 0): "
            + (f"{mean(start_f1[method].values()):.2f}" if start_f1.get(method) else "–"),
            "",
            f"| {tag} | val F1 | per seed | val companion halluc % | selected |",
            "|---|---|---|---|---|",
        ]
        best = float(select(tune, method, tag, "f1")[0])
        for v, per in sorted(values.items()):
            f1s = [per[s]["f1"] for s in sorted(per)]
            ch = [per[s].get("companion_halluc", float("nan")) for s in sorted(per)]
            out.append(
                f"| {v:g} | {mean(f1s):.2f} | {', '.join(f'{x:.2f}' for x in f1s)} | "
                f"{mean(ch):.1f} | {'**yes**' if v == best else ''} |"
            )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(tables(Path(sys.argv[1])))
