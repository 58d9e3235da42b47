"""Hydra multirun sweep (2 jobs, tiny budget) and `cwdpo.report` over it; launcher configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cwdpo.report import aggregate, find_runs, main, stability

ROOT = Path(__file__).resolve().parent.parent
FAST = ["+debug=fast", "eval.caption_metrics=false", "eval.calibration=false"]


def _train(args: list[str], cache: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "CWDPO_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "cwdpo.train", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_job_multirun_and_report(tmp_path, tiny_cache_dir):
    sweep = tmp_path / "sweep"
    _train(["-m", *FAST, "stage=cw_dpo", "+experiment=ablation_cooling", "seed=0,1",
            f"hydra.sweep.dir={sweep}"], tiny_cache_dir)
    runs = find_runs([sweep])
    assert len(runs) == 2
    seeds = sorted(json.loads((r / "results.json").read_text())["config"]["seed"] for r in runs)
    assert seeds == [0, 1]
    table = main([str(sweep)])
    agg = json.loads((sweep / "report.json").read_text())
    assert list(agg) == ["ablation_cooling"] and agg["ablation_cooling"]["n"] == 2
    facts = [json.loads((r / "results.json").read_text())["stages"]["cw_dpo"]["fact_accuracy"]
             for r in runs]
    assert agg["ablation_cooling"]["fact_accuracy"]["mean"] == pytest.approx(sum(facts) / 2)
    assert "ablation_cooling" in table and (sweep / "report.png").stat().st_size > 0


def test_stability_statistics_on_a_constructed_log(tmp_path):
    rows = ["step,train/loss,train/grad_norm,train/rewards/accuracies"]
    for s in range(60):
        loss = 1.0 + (5.0 if s == 40 else 0.0) + 0.01 * (s % 3)
        rows.append(f"{s},{loss},{2.0 + 0.1 * (s % 2)},{min(1.0, s / 30)}")
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
        (d / "results.json").write_text(json.dumps(
            {"config": {"experiment": exp, "seed": seed}, "stages": {"cw_dpo": {"fact_accuracy": acc}}}))
    agg = aggregate(find_runs([tmp_path]))
    assert agg["dpo"]["n"] == 2 and agg["dpo"]["fact_accuracy"]["mean"] == 55.0
    assert agg["dpo"]["fact_accuracy"]["std"] == pytest.approx(7.0710678)
    assert agg["cw_dpo"]["n"] == 1
    with pytest.raises(FileNotFoundError, match="nope"):
        find_runs([tmp_path / "nope"])


@pytest.mark.parametrize("launcher", ["local_parallel", "slurm"])
def test_launcher_and_optuna_configs_compose(launcher, tmp_path):
    env = {**os.environ, "CWDPO_CACHE": str(tmp_path)}
    for args in ([f"hydra/launcher={launcher}"], ["+hparams_search=optuna"]):
        proc = subprocess.run([sys.executable, "-m", "cwdpo.train", *args, "--cfg", "hydra"],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert ("launcher" in proc.stdout) and ("sweeper" in proc.stdout)
