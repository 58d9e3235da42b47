"""Hydra multirun sweep (2 jobs, tiny budget) and `cwdpo.report` over it; launcher configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cwdpo.analysis.runs import find_runs, stability
from cwdpo.analysis.stats import aggregate
from cwdpo.analysis.tables import markdown
from cwdpo.report import main

ROOT = Path(__file__).resolve().parent.parent
FAST = ["+debug=fast", "eval.caption_metrics=false", "eval.calibration=false"]


def _train(args: list[str], cache: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "CWDPO_CACHE": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-m", "cwdpo.train", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.subprocess
def test_two_job_multirun_and_report(tmp_path, tiny_cache_dir):
    sweep = tmp_path / "sweep"
    _train(
        [
            "-m",
            *FAST,
            "stage=cw_dpo",
            "+experiment=ablation_cooling",
            "seed=0,1",
            f"hydra.sweep.dir={sweep}",
        ],
        tiny_cache_dir,
    )
    runs = find_runs([sweep])
    assert len(runs) == 2
    seeds = sorted(json.loads((r / "results.json").read_text())["config"]["seed"] for r in runs)
    assert seeds == [0, 1]
    table = main([str(sweep)])
    agg = json.loads((sweep / "report.json").read_text())
    assert list(agg) == ["ablation_cooling"] and agg["ablation_cooling"]["n"] == 2
    facts = [
        json.loads((r / "results.json").read_text())["stages"]["cw_dpo"]["fact_accuracy"]
        for r in runs
    ]
    assert agg["ablation_cooling"]["fact_accuracy"]["mean"] == pytest.approx(sum(facts) / 2)
    assert "ablation_cooling" in table and (sweep / "report.png").stat().st_size > 0


def test_stability_statistics_on_a_constructed_log(tmp_path):
    rows = ["step,train/loss,train/grad_norm,train/rewards/accuracies"]
    for s in range(60):
        loss = 1.0 + (5.0 if s == 40 else 0.0) + 0.01 * (s % 3)
        acc = 1.0 if s == 0 else min(1.0, s / 30)  # one lucky first batch must not count
        rows.append(f"{s},{loss},{2.0 + 0.1 * (s % 2)},{acc}")
    csv = tmp_path / "metrics.csv"
    csv.write_text("\n".join(rows) + "\n")
    out = stability(csv, window=10, target=0.9)
    assert out["loss_spikes"] == 1.0
    assert out["steps_to_target"] > 27 and out["steps_to_target"] < 40
    assert out["grad_norm_std"] == pytest.approx(0.0527, abs=1e-3)


def test_report_groups_seeds_and_rejects_missing_dirs(tmp_path):
    for i, (exp, seed, acc) in enumerate([("dpo", 0, 50.0), ("dpo", 1, 60.0), ("cw_dpo", 0, 70.0)]):
        d = tmp_path / str(i)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- +experiment={exp}\n- seed={seed}\n")
        (d / "results.json").write_text(
            json.dumps(
                {
                    "config": {"experiment": exp, "seed": seed},
                    "stages": {"cw_dpo": {"fact_accuracy": acc}},
                }
            )
        )
    agg = aggregate(find_runs([tmp_path]))
    assert agg["dpo"]["n"] == 2 and agg["dpo"]["fact_accuracy"]["mean"] == 55.0
    assert agg["dpo"]["fact_accuracy"]["std"] == pytest.approx(7.0710678)
    assert agg["cw_dpo"]["n"] == 1
    with pytest.raises(FileNotFoundError, match="nope"):
        find_runs([tmp_path / "nope"])


def _fake_run(
    d: Path,
    exp: str,
    seed: int,
    outputs: list[str],
    overrides: tuple[str, ...] = (),
    steps_csv: str | None = None,
    source: dict | None = None,
) -> None:
    """A run directory as the pipeline writes it: overrides, resolved config, results, marker."""
    import yaml

    stage = "sft_c" if exp == "sft_only" else "cw_dpo"
    (d / ".hydra").mkdir(parents=True)
    (d / "checkpoints").mkdir()
    (d / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([f"+experiment={exp}", f"seed={seed}", *overrides])
    )
    source = source or {
        "_target_": "cwdpo.data.sources.ShapesSource",
        "seed": seed,
        "sizes": {"test": len(outputs)},
    }
    (d / "config.yaml").write_text(
        yaml.safe_dump(
            {"data": {"source": source}, "eval": {"split": "test", "n_records": len(outputs)}}
        )
    )
    (d / "results.json").write_text(
        json.dumps(
            {"config": {"experiment": exp, "seed": seed}, "stages": {stage: {"fact_accuracy": 1.0}}}
        )
    )
    (d / "checkpoints" / f"{stage}.done.json").write_text(json.dumps({"outputs": outputs}))
    if steps_csv is not None:
        (d / "csv" / stage).mkdir(parents=True)
        (d / "csv" / stage / "metrics.csv").write_text(steps_csv)


def test_win_rate_against_the_baseline_run_of_the_same_seed(tmp_path):
    from cwdpo.data.sources import ShapesSource

    n = 12
    records = {s: ShapesSource(seed=s, sizes={"test": n}).captions("test") for s in (0, 1)}
    truth = {s: [r.references[0] for r in records[s]] for s in (0, 1)}
    wrong = "a large pink hexagon in the middle ."
    # baseline: seed 0 right on the first half; seed 1 right everywhere
    base = {0: truth[0][: n // 2] + [wrong] * (n - n // 2), 1: truth[1]}
    # the method: right on the last 9 (seed 0) / right on the first 3 (seed 1)
    ours = {0: [wrong] * 3 + truth[0][3:], 1: truth[1][:3] + [wrong] * (n - 3)}
    # a harder-negatives sweep that ran its own baseline: must be compared with that one
    hard_base = {0: [wrong] * n}
    for s in (0, 1):
        _fake_run(tmp_path / f"base{s}", "sft_only", s, base[s])
        _fake_run(
            tmp_path / f"ours{s}",
            "cw_dpo",
            s,
            ours[s],
            steps_csv="step,train/rewards/accuracies\n"
            + "".join(f"{i},{1.0 if s == 0 else 0.0}\n" for i in range(12)),
        )
    _fake_run(tmp_path / "hbase0", "sft_only", 0, hard_base[0], ("negatives.easy_fraction=0.9",))
    _fake_run(tmp_path / "hours0", "cw_dpo", 0, ours[0], ("negatives.easy_fraction=0.9",))
    # seed 2: its data (a cluster path) is not readable here: no win-rate, no crash, counted
    gone = {
        "_target_": "cwdpo.data.sources.CaptionFileSource",
        "format": "karpathy",
        "annotations": str(tmp_path / "gone.json"),
        "image_root": str(tmp_path),
    }
    _fake_run(tmp_path / "base2", "sft_only", 2, truth[0], source=gone)
    _fake_run(tmp_path / "ours2", "cw_dpo", 2, truth[0], source=gone)

    def brute(a: list[str], b: list[str], seed: int) -> float:  # facts judge, ties half
        src = ShapesSource(seed=seed, sizes={"test": n})
        sa = [src.score(x, r) for x, r in zip(a, records[seed])]
        sb = [src.score(x, r) for x, r in zip(b, records[seed])]
        return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(sa, sb)) / n

    w0, w1, w_hard = (
        brute(ours[0], base[0], 0),
        brute(ours[1], base[1], 1),
        brute(ours[0], hard_base[0], 0),
    )
    assert len({w0, w1, w_hard}) == 3  # the three comparisons are distinguishable
    agg = aggregate(find_runs([tmp_path]))
    assert agg["cw_dpo"]["win_vs_baseline"]["mean"] == pytest.approx(100 * (w0 + w1) / 2)
    assert (
        agg["cw_dpo"]["win_vs_baseline"]["reached"] == 2
        and agg["cw_dpo"]["win_vs_baseline"]["of"] == 3
    )
    assert agg["cw_dpo negatives.easy_fraction=0.9"]["win_vs_baseline"]["mean"] == pytest.approx(
        100 * w_hard
    )
    assert "win_vs_baseline" not in agg["sft_only"]
    # steps→target counts the seeds that never reached it instead of hiding them
    assert agg["cw_dpo"]["steps_to_target"] == {
        "mean": 9.0,
        "std": 0.0,
        "reached": 1,
        "of": 2,
    }  # full window
    assert "(1/2)" in markdown(agg, "sft_only")
    assert "win_vs_baseline" not in aggregate(find_runs([tmp_path]), baseline=None)["cw_dpo"]
    # another target: never reached
    strict = aggregate(find_runs([tmp_path]), baseline=None, target=1.5)["cw_dpo"][
        "steps_to_target"
    ]
    assert strict == {"reached": 0, "of": 2}


@pytest.mark.subprocess
@pytest.mark.parametrize("launcher", ["local_parallel", "slurm"])
def test_launcher_and_optuna_configs_compose(launcher, tmp_path):
    env = {**os.environ, "CWDPO_CACHE": str(tmp_path)}
    for args in ([f"hydra/launcher={launcher}"], ["+hparams_search=optuna"]):
        proc = subprocess.run(
            [sys.executable, "-m", "cwdpo.train", *args, "--cfg", "hydra"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert ("launcher" in proc.stdout) and ("sweeper" in proc.stdout)


def test_sweep_series_finds_one_knob_sweeps(tmp_path):
    from cwdpo.analysis.report_plots import plot_sweeps, sweep_series

    stat = {"fact_accuracy": {"mean": 1.0, "std": 0.0}}
    agg = {f"ablation_mix negatives.dataset_fraction={v}": stat for v in ("0", "0.25", "1")}
    agg |= {
        "cw_dpo": stat,
        "cw_dpo a=1 b=2": stat,
        "dpo x=1": stat,
        "dpo x=2": stat,
        "ipo loss=sigmoid": stat,
        "ipo loss=x": stat,
        "ipo loss=y": stat,
    }
    series = sweep_series(agg)
    assert list(series) == ["ablation_mix negatives.dataset_fraction"]  # dpo: 2 values only
    assert [x for x, _ in series["ablation_mix negatives.dataset_fraction"]] == [0.0, 0.25, 1.0]
    (path,) = plot_sweeps(agg, tmp_path)
    assert path.name == "report_sweeps.png" and path.stat().st_size > 0
