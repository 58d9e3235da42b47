"""The study's scripts under experiments/testbed: the pair-contrast count and the figures."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(
        name, ROOT / "experiments" / "testbed" / f"{name}.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


COMP = ("blue", "square")


@pytest.mark.parametrize(
    "chosen, rejected, kind",
    [
        (
            "a small red circle on the left .",
            "a small red circle on the left and a small blue square on the right .",
            "corrective",
        ),
        (
            "a small red circle on the left and a small blue square on the right .",
            "a small red circle on the left .",
            "anti_corrective",
        ),
        ("a large blue square on the top .", "a small blue square on the top .", "both"),
        ("a small red circle on the left .", "a large red circle on the left .", "neither"),
        (
            "a small red circle on the left .",
            "a small blue circle on the left .",
            "neither",
        ),  # a blue circle is no companion
    ],
)
def test_pair_kind_on_hand_written_pairs(chosen, rejected, kind):
    assert _script("pair_contrast").pair_kind(chosen, rejected, COMP) == kind


def _write_run(d: Path, f1: float, curve: list[tuple[int, float, float]] | None = None) -> None:
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"stages": {"cw_dpo": {"f1": f1}}}))
    if curve:
        with (d / "heldout.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["stage", "step", "split", "n", "f1", "companion_halluc"])
            w.writerows(["cw_dpo", s, "val", 64, v, c] for s, v, c in curve)


def test_figures_are_drawn_from_reports_and_runs(tmp_path, monkeypatch):
    plots = _script("plots")
    assert (
        plots.label("cw_dpo negatives=companion_edit stage.cw_dpo.optimizer.lr=1e-4")
        == "CW-DPO, lr 1e-4"
    )
    assert (
        plots.label("cw_dpo negatives=self_judged stage.cw_dpo.optimizer.lr=1e-4")
        == "CW-DPO, best-vs-worst pairs, lr 1e-4"
    )
    assert (
        plots.label("cw_dpo negatives=companion_edit stage_seed_offset=1000")
        == "CW-DPO (A/A rerun)"
    )
    assert plots.label("ipo stage.cw_dpo.beta=0.5") == "IPO, β 0.5"
    paired = {
        "a": "cw_dpo",
        "b": "ablation_cooling",
        "seeds": [0, 1],
        "diffs": [1.0, 2.0],
        "mean": 1.5,
        "ci95": [1.0, 2.0],
    }
    report = tmp_path / "report.json"
    stats = {"companion_halluc": {"mean": 40.0, "std": 5.0}}
    report.write_text(
        json.dumps(
            {
                "cw_dpo negatives=self_judged": stats,
                "sft_only": stats,
                "paired": [{**paired, "metric": "f1"}, {**paired, "metric": "companion_halluc"}],
            }
        )
    )
    for s in (10, 11):
        for lr, f1 in ((1e-4, 70.0), (2e-4, 72.0)):
            _write_run(tmp_path / "tune" / f"seed{s}" / f"cw_dpo_lr{lr:g}", f1 + s)
        _write_run(tmp_path / "tune" / f"seed{s}" / "ipo_beta0.5", 60.0)
        _write_run(
            tmp_path / "curves" / f"seed{s}" / "cw_dpo", 70.0, [(0, 70.0, 40.0), (20, 71.5, 38.0)]
        )
    out = tmp_path / "figs"
    argv = [
        "plots.py",
        "--out",
        str(out),
        "--report",
        str(report),
        "--tune",
        str(tmp_path / "tune"),
        "--curves",
        str(tmp_path / "curves"),
        "--h-report",
        f"0={report}",
        "--h-report",
        f"0.3={report}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    drawn = {}  # figure name → its data, read off the figure before it is saved and closed

    def save(fig, path):
        drawn[path.stem] = [_lines(ax) for ax in fig.axes]
        return real_save(fig, path)

    real_save = plots.save
    monkeypatch.setattr(plots, "save", save)
    plots.main()
    for name in ("paired", "tuning", "heldout", "companion"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # paired: per metric, the CI [1, 2] as a segment, the mean 1.5, the seeds' differences
    for ax in drawn["paired"]:
        assert ax["lines"][:3] == [([1.0, 2.0], [0, 0]), ([1.5], [0]), ([1.0, 2.0], [0.18] * 2)]
        assert ax["yticks"] == ["CW-DPO − DPO"]
    # tuning: one panel per knob; val F1 = the mean over the two tuning seeds; ★ at the best
    beta, lr = drawn["tuning"]
    assert lr["lines"] == [([1e-4, 2e-4], [80.5, 82.5]), ([2e-4], [82.5])]
    assert beta["lines"] == [([0.5], [60.0]), ([0.5], [60.0])]
    # heldout: change from the start, mean over seeds (F1 +1.5, companion −2 at step 20)
    f1, comp = drawn["heldout"]
    assert f1["lines"][0] == ([0, 20], [0.0, 1.5]) and comp["lines"][0] == ([0, 20], [0.0, -2.0])
    assert f1["legend"] == ["CW-DPO (n=2)"]
    # companion: the two default settings at h = 0 and 0.3 (offset a little apart), each as
    # its mean 40 and the error-bar caps at mean ± std 5
    (ax,) = drawn["companion"]
    assert ax["legend"] == ["SFT-C", "CW-DPO"]
    assert [ys for _, ys in ax["lines"]] == [[40.0, 40.0], [35.0, 35.0], [45.0, 45.0]] * 2
    assert [round(x, 3) for x in ax["lines"][0][0]] == [-0.006, 0.294]


def _lines(ax) -> dict:
    """What a reader sees on `ax`: each line's (x, y), the y tick labels and the legend."""
    legend = ax.get_legend()
    lines = [
        ([float(x) for x in ln.get_xdata()], [float(y) for y in ln.get_ydata()])
        for ln in ax.get_lines()
    ]
    rules = [(xs, ys) for xs, ys in lines if [0, 1] in (xs, ys)]  # axhline / axvline
    return {
        "lines": [line for line in lines if line not in rules],
        "yticks": [t.get_text() for t in ax.get_yticklabels()],
        "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
    }


def test_mean_wc_is_the_mean_over_runs_of_each_runs_mean(tmp_path):
    runs = []
    for name, ws in (("a", [0.1, 0.3, None]), ("b", [0.5])):  # NaN rows (other metrics) skipped
        d = tmp_path / name / "csv" / "cw_dpo"
        d.mkdir(parents=True)
        rows = ["step,train/cooling/mean,train/loss"]
        rows += [f"{i},{'' if w is None else w},0.7" for i, w in enumerate(ws)]
        (d / "metrics.csv").write_text("\n".join(rows) + "\n")
        runs.append(tmp_path / name)
    assert _script("mean_wc").mean_wc(runs) == pytest.approx((0.2 + 0.5) / 2)
    with pytest.raises(SystemExit, match="no CW-DPO run"):
        _script("mean_wc").mean_wc([])


def _write_stage(d: Path, **metrics: float) -> None:
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"stages": {"cw_dpo": metrics}}))


def test_select_on_val_applies_each_rule_to_the_mean_over_tuning_seeds(tmp_path, capsys):
    """Means over seeds 30, 31 (hand-computed): lr 1e-4 → (halluc 5, F1 80, facts 70),
    2e-4 → (2, 78, 75), 4e-4 → (2, 79, 60); companion_halluc ties 2e-4 / 4e-4 on the primary
    and the higher F1 breaks it."""
    runs = {  # lr → per-seed (companion_halluc, f1, fact_accuracy)
        "1e-4": [(4.0, 81.0, 71.0), (6.0, 79.0, 69.0)],
        "2e-4": [(1.0, 77.0, 74.0), (3.0, 79.0, 76.0)],
        "4e-4": [(2.0, 80.0, 61.0), (2.0, 78.0, 59.0)],
    }
    for lr, per_seed in runs.items():
        for s, (h, f1, facts) in zip((30, 31), per_seed, strict=True):
            _write_stage(
                tmp_path / f"seed{s}" / f"cw_dpo_lr{lr}",
                companion_halluc=h,
                f1=f1,
                fact_accuracy=facts,
            )
    _write_stage(tmp_path / "seed30" / "cw_dpo_shuffled_lr9e-9", f1=99.0)  # another method
    sel = _script("select_on_val")
    assert sel.select(tmp_path, "cw_dpo", "lr", "f1")[0] == "1e-4"
    assert sel.select(tmp_path, "cw_dpo", "lr", "companion_halluc")[0] == "4e-4"
    assert sel.select(tmp_path, "cw_dpo", "lr", "fact_accuracy")[0] == "2e-4"
    assert sel.select(tmp_path, "cw_dpo_shuffled", "lr", "f1")[0] == "9e-9"
    sel.main([str(tmp_path), "lr", "f1", "cw_dpo", "cw_dpo_shuffled"])
    out = capsys.readouterr()
    assert out.out == "cw_dpo=1e-4 cw_dpo_shuffled=9e-9\n"
    assert "cw_dpo: val f1 by lr {'1e-4': 80.0, '2e-4': 78.0, '4e-4': 79.0} -> 1e-4" in out.err
    with pytest.raises(SystemExit, match="no rpo_lr<value> runs under"):
        sel.select(tmp_path, "rpo", "lr", "f1")
