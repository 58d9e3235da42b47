"""The report's columns and its markdown tables (aggregate and paired differences)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

COLUMNS = (  # (key, header, scale)
    ("fact_accuracy", "facts %", 1.0),
    ("exact", "exact %", 1.0),
    ("cider", "CIDEr", 1.0),
    ("win_vs_baseline", "win vs baseline %", 100.0),
    ("winrate/win_rate", "win vs prev stage %", 100.0),
    ("calib/ece", "ECE", 1.0),
    ("calib/entropy", "entropy", 1.0),
    ("calib/mean_top1_prob", "top-1 p", 1.0),
    ("loss_std", "loss std", 1.0),
    ("grad_norm_std", "‖g‖ std", 1.0),
    ("loss_spikes", "spikes", 1.0),
    ("steps_to_target", "steps→target", 1.0),
    ("steps_to_heldout", "steps→val target", 1.0),
    ("heldout_gain_final", "val gain", 1.0),
    ("heldout_jitter", "val jitter", 1.0),
    # ShapesWorld ground truth (percent; cwdpo.metrics.hallucination / .teacher_forced)
    ("f1", "F1 %", 1.0),
    ("object_recall", "obj recall %", 1.0),
    ("chair_i", "CHAIR_i %", 1.0),
    ("chair_s", "CHAIR_s %", 1.0),
    ("companion_halluc", "companion halluc %", 1.0),
    ("pope/f1", "POPE F1", 1.0),
    ("pope_adv/accuracy", "POPE-adv acc", 1.0),
    ("malformed", "malformed %", 1.0),
    ("length", "length", 1.0),
    ("calib/content_ece", "content ECE", 1.0),
    ("calib/content_sce", "content SCE", 1.0),
    ("disp/chosen_fell", "gold logp fell %", 1.0),
)
STEP_COLUMNS = ("steps_to_target", "steps_to_heldout")  # NaN = never reached: counted, not averaged
PRIMARY = "f1"  # the study's pre-declared primary metric (falls back to facts % where absent)
HEADERS = {k: h for k, h, _ in COLUMNS}


def markdown(agg: dict[str, dict[str, Any]], baseline: str | None = None) -> str:
    cols = [(k, h) for k, h, _ in COLUMNS if any(k in g for g in agg.values())]
    lines = [
        "| setting | n | " + " | ".join(h for _, h in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for key, g in agg.items():
        cells = [_cell(g.get(k)) for k, _ in cols]
        lines.append(f"| {key} | {g['n']} | " + " | ".join(cells) + " |")
    notes = []
    if baseline and any("win_vs_baseline" in g for g in agg.values()):
        notes.append(
            f"win vs baseline: win-rate of the final test captions against the `{baseline}` "
            "run of the same seed and test data (ties count half)."
        )
    if any("of" in v for g in agg.values() for v in g.values() if isinstance(v, dict)):
        notes.append(
            "(k/n): the mean is over the k of n runs that gave a value; for steps→target "
            "and steps→val target, the runs that reached the target."
        )
    return "\n".join(lines) + "\n" + "".join(f"\n{n}\n" for n in notes)


def _cell(stat: dict[str, Any] | None) -> str:
    if not stat or "mean" not in stat:
        return f"– (0/{stat['of']})" if stat and "of" in stat else "–"
    text = f"{stat['mean']:.3g} ± {stat['std']:.2g}"
    return text + (f" ({stat['reached']}/{stat['of']})" if "of" in stat else "")


PAIRED_NOTE = (
    "t 95% CI and t p: paired t-test on the per-seed differences; Holm p: the t p "
    "Holm-corrected over every row of this table; sign-flip p: exact sign-flip permutation test, "
    "whose smallest possible value is 2^(1−n) (0.0625 at n = 5, so never below 0.05); MDE (80%): "
    "the effect the paired t-test detects with 80% power given the observed sd, at α = 0.05 and "
    "at Holm's strictest level α/m (m = the rows with a t p: what a Holm p < 0.05 needs at worst); "
    "McNemar: b/c = captions (paired by seed and test image, pooled over seeds) where only A / "
    "only B has the flag, exact p (pooling ignores clustering by seed); bootstrap CIs in "
    "report.json."
)


def _p(x: float) -> str:
    return "–" if x != x else f"{x:.3g}"


def paired_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The paired-differences table: per-seed A − B, t-interval, t / Holm / sign-flip p, MDE,
    wins and (per-caption rates) McNemar; see PAIRED_NOTE, printed under it."""
    head = (
        "A − B",
        "metric",
        "seeds",
        "per-seed A − B",
        "mean",
        "t 95% CI",
        "t p",
        "Holm p",
        "sign-flip p",
        "MDE (80%) α / α/m",
        "A > B",
        "McNemar b/c, p",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = f"{r['a']} − {r['b']} | {HEADERS.get(r['metric'], r['metric'])}"
        if not r["seeds"]:  # e.g. displacement vs a run without π_ref
            lines.append(f"| {name} | 0 |" + " – |" * (len(head) - 3))
            continue
        n = len(r["seeds"])
        per = ", ".join(f"{x:+.3g}" for x in r["diffs"])
        lo, hi = r["t_ci95"]
        ci = "–" if lo != lo else f"[{lo:+.3g}, {hi:+.3g}]"
        mc = r.get("mcnemar")
        mc_cell = f"{mc['b']}/{mc['c']}, {_p(mc['p'])}" if mc else "–"
        mde = "–" if r["mde80"] != r["mde80"] else f"{r['mde80']:.3g}"
        holm_mde = r.get("mde80_holm", float("nan"))
        mde += "" if holm_mde != holm_mde else f" / {holm_mde:.3g}"
        lines.append(
            f"| {name} | {n} | {per} | {r['mean']:+.3g} | {ci} | {_p(r['t_p'])} | "
            f"{_p(r.get('holm_p', float('nan')))} | {_p(r['perm_p'])} | {mde} | "
            f"{r['wins']}/{n} | {mc_cell} |"
        )
    return "\n".join(lines) + "\n\n" + PAIRED_NOTE + "\n"


def selection_note(metric: str, selection: dict[str, set[str]]) -> str:
    """The line under the table naming the setting kept per experiment (`--select`)."""
    return (
        "\nSelected on val ("
        + metric
        + "): "
        + "; ".join(
            f"{k}: {' '.join(sorted(v)) or 'defaults'}" for k, v in sorted(selection.items())
        )
        + "\n"
    )
