"""The bench's text: the table and target lines one run prints (`report_text`), and one markdown
table over saved bench JSONs (`summarize`, `make bench`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


def report_text(res: dict[str, Any]) -> str:
    s = res["setup"]
    c = s["composition"]
    lines = [
        f"device: {s['device']}  precision: {s['precision']}  pairs/batch: {s['pairs']}  "
        f"rounds: {s['rounds']}, medians of {res['clock']} time",
        f"sequence: {c['image_tokens_per_row']:.0f} image + {c['prompt_text_tokens_per_row']:.0f} "
        f"prompt + {c['response_tokens_per_row']:.1f} response tokens per row",
        "",
        f"{'variant':<26}{'step s':>8}{'IQR s':>14}{'wall s':>8}{'pairs/s':>9}{'vs TRL':>8}"
        f"{'peak MB':>9}{'state MB':>10}",
    ]
    vs = res["ratios"]["throughput_vs_trl"]
    for name, v in res["variants"].items():
        r = "1.00" if name == "trl/dpo" else (f"{vs[name]:.2f}" if name in vs else "–")
        st = v["state_mb"].get("total", float("nan"))
        iqr = f"{v['p25_s']:.3f}-{v['p75_s']:.3f}"
        lines.append(
            f"{name:<26}{v['median_s']:>8.3f}{iqr:>14}{v['wall_median_s']:>8.3f}"
            f"{v['samples_per_s']:>9.1f}{r:>8}"
            f"{v['peak_step_mb']:>9.1f}{st:>10.2f}"
        )
    r = res["ratios"]
    lines += [
        "",
        "CW-DPO overhead over our DPO (median of adjacent-step ratios [IQR]): "
        + ", ".join(
            f"{k} {100 * x:+.1f}% [{100 * a:+.1f}, {100 * b:+.1f}]"
            for (k, x), (a, b) in zip(
                r["cw_overhead_vs_our_dpo"].items(), r["cw_overhead_iqr"].values()
            )
        )
        + f"; objective alone: {r['cw_objective_extra_us']:.0f} µs/step "
        f"({100 * r['cw_objective_extra_frac_of_step']:.3f}% of a step)",
        f"prefix sharing: {r['prefix_speedup_vs_plain']:.2f}× plain; ref cache: "
        f"{r['cache_speedup_vs_prefix']:.2f}× prefix",
    ]
    t = res["targets"]
    lines.append(
        f"targets: CW overhead {100 * t['cw_overhead_measured']:+.1f}% (≤ 3%: "
        f"{'met' if t['cw_overhead_met'] else 'NOT met'}); our DPO ({t['our_best_dpo']}) vs TRL "
        + (
            f"{t['vs_trl_measured']:.2f}× (≥ 1.5×: {'met' if t['vs_trl_met'] else 'NOT met'})"
            if t["vs_trl_measured"]
            else "not measured"
        )
    )
    if "generation" in res:
        g = res["generation"]
        lines.append(
            f"on-policy generation: {g['tokens_per_s']:.0f} tokens/s "
            f"({g['sequences_per_round']} samples × ≤{g['max_new_tokens']} tokens)"
        )
    lines.append(f"json: {s.get('json')}  ({s['seconds']:.0f} s)")
    return "\n".join(lines)


def summarize(paths: list[str | Path]) -> str:
    """One markdown table over bench JSONs (one row per model × checkpointing setting):
    samples/s of our plain / prefix / prefix+cache DPO and TRL's, speed-ups vs TRL, CW-DPO's
    overhead and peak step memory vs TRL's."""
    cols = [
        "model",
        "image+prompt+response tokens",
        "grad ckpt",
        "plain",
        "prefix",
        "prefix+cache",
        "TRL",
        "prefix vs TRL",
        "prefix+cache vs TRL",
        "CW-DPO overhead",
        "peak MB ours / TRL",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for p in paths:
        r = json.loads(Path(p).read_text())
        s, v, c = r["setup"], r["variants"], r["setup"]["composition"]
        sps = {k: x["samples_per_s"] for k, x in v.items()}
        trl = sps.get("trl/dpo")

        def vs(k: str, sps: dict = sps, trl: float | None = trl) -> str:
            return f"{sps[k] / trl:.2f}×" if trl and k in sps else "–"

        peak = v.get("dpo/prefix+cache", {}).get("peak_step_mb", float("nan"))
        tpeak = v.get("trl/dpo", {}).get("peak_step_mb")
        name = re.sub(r"^tiny-(.+)-[0-9a-f]{12}$", r"tiny \1", Path(s["model"]).name)
        row = [
            name,
            f"{c['image_tokens_per_row']:.0f}+{c['prompt_text_tokens_per_row']:.0f}+"
            f"{c['response_tokens_per_row']:.1f}",
            "on" if s.get("gradient_checkpointing") else "off",
            *(
                f"{sps[k]:.1f}" if k in sps else "–"
                for k in ("dpo/plain", "dpo/prefix", "dpo/prefix+cache", "trl/dpo")
            ),
            vs("dpo/prefix"),
            vs("dpo/prefix+cache"),
            f"{100 * r['ratios']['cw_overhead_vs_our_dpo']['prefix+cache']:+.1f}%",
            f"{peak:.1f} / {tpeak:.1f}" if tpeak else f"{peak:.1f} / –",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def on_policy_text(res: dict[str, Any]) -> str:
    """The on-policy section as markdown: sampling tokens/s per model and K (plain vs shared
    prefill), then the stage-2 runs at each dataset size."""
    ks = sorted({k for m in res["sampling"].values() for k in m["k"]}, key=int)
    head = ["model", "image tokens", "records"]
    for k in ks:
        head += [f"K={k} plain tok/s", f"K={k} shared tok/s", f"K={k} speed-up"]
        head += [f"K={k} prefill-only speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in res["sampling"].items():
        row = [name, str(m["image_tokens_per_record"]), str(m["records"])]
        for k in ks:
            r = m["k"].get(k)
            row += (
                [f"{r['plain']['tokens_per_s']:.0f}", f"{r['shared']['tokens_per_s']:.0f}"]
                + [f"{r['speedup']:.2f}×", f"{r['speedup_dynamic']:.2f}×"]
                if r
                else ["–"] * 4
            )
        lines.append("| " + " | ".join(row) + " |")
    t = res.get("target", {})
    if t.get("measured") is not None:
        lines.append(
            f"\ntarget: shared prefill ≥ {t['min_speedup']}× at K={t['k']} on {t['model']}: "
            f"{t['measured']:.2f}× ({'met' if t['met'] else 'NOT met'})"
        )
    if res.get("stage2"):
        cols = [
            "train images",
            "stage-2 records",
            "steps × batch",
            "samples",
            "samples/pair",
            "sampling s",
            "s to first step (wall / CPU)",
            "stage s",
        ]
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in res["stage2"]:
            lines.append(
                f"| {r['train_images']} | {r['stage2_records']} | {r['steps']} × "
                f"{r['batch_size']} | {r['samples_generated']} | {r['samples_per_pair']:.1f} | "
                f"{r['sampling_s']:.1f} | {r['first_step_s']:.1f} / {r['first_step_cpu_s']:.1f} | "
                f"{r['stage_train_s']:.1f} |"
            )
    s = res.get("setup", {})
    lines.append(f"\ndevice: {s.get('device')}; json: {s.get('json')}")
    return "\n".join(lines)
