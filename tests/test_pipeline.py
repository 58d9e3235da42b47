"""End to end: the whole two-stage pipeline on a seconds-long budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cwdpo.run.pipeline import run_pipeline
from tests.helpers import compose_cfg

FAST = ["+debug=fast", "eval.caption_metrics=true", "eval.meteor=false"]


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory, tiny_cache_dir):
    out = tmp_path_factory.mktemp("run")
    cfg = compose_cfg(FAST, out, tiny_cache_dir)
    return out, run_pipeline(cfg)


def test_pipeline_runs_every_stage_and_writes_outputs(fast_run):
    out, res = fast_run
    assert list(res["stages"]) == ["start", "base_sft", "sft_c", "cw_dpo"]
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["stages"].keys() == res["stages"].keys()
    for stage in ("base_sft", "sft_c", "cw_dpo"):
        assert (out / "checkpoints" / f"{stage}_hf" / "model.safetensors").is_file()
        assert (out / "csv" / stage / "metrics.csv").is_file()
        m = res["stages"][stage]
        assert m["steps"] > 0
        for key in ("fact_accuracy", "cider", "bleu_4", "rouge_l", "calib/ece", "winrate/win_rate"):
            assert key in m, key
    assert "| cw_dpo |" in (out / "results.md").read_text()
    pc = res["stages"]["cw_dpo"]
    assert 0.0 <= pc["pref_calib/ece"] <= 1.0 and pc["pref_calib/n"] > 0


def test_cw_dpo_logs_the_required_quantities(fast_run):
    out, _ = fast_run
    header = (out / "csv" / "cw_dpo" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in (
        "train/loss",
        "train/rewards/chosen",
        "train/rewards/rejected",
        "train/rewards/margins",
        "train/rewards/accuracies",
        "train/logps/chosen",
        "train/logps/rejected",
        "train/ell/chosen",
        "train/ell/rejected",
        "train/cooling/mean",
        "train/cooling/min",
        "train/cooling/max",
    ):
        assert key in header, key
    sft = (out / "csv" / "sft_c" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/loss", "train/nll_pos", "train/nll_neg", "train/penalty"):
        assert key in sft, key


def test_stage_two_alone_from_a_saved_policy(fast_run, tmp_path, tiny_cache_dir):
    out, _ = fast_run
    cfg = compose_cfg(
        [
            *FAST,
            "stage=cw_dpo",
            f"model.path={out / 'checkpoints' / 'sft_c_hf'}",
            "eval.caption_metrics=false",
            "eval.calibration=false",
        ],
        tmp_path,
        tiny_cache_dir,
    )
    res = run_pipeline(cfg)
    assert list(res["stages"]) == ["start", "cw_dpo"]
    assert res["stages"]["cw_dpo"]["steps"] == 2


def test_bad_stage_order_is_rejected(tmp_path, tiny_cache_dir):
    cfg = compose_cfg([*FAST, "stage.run=[cw_dpo,sft_c]"], tmp_path, tiny_cache_dir)
    with pytest.raises(ValueError, match="base_sft → sft_c → cw_dpo"):
        run_pipeline(cfg)


@pytest.mark.subprocess
def test_cli_entry_point(tmp_path, tiny_cache_dir):
    env = {**os.environ, "CWDPO_CACHE": str(tiny_cache_dir)}
    cmd = [
        sys.executable,
        "-m",
        "cwdpo.train",
        *FAST,
        "eval.caption_metrics=false",
        "+experiment=ablation_cooling",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        umask=0o022,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"]["experiment"] == "ablation_cooling"
    cfg = (tmp_path / "config.yaml").read_text()
    assert "cooling: false" in cfg
    assert "| cw_dpo |" in proc.stdout
    # A newcomer's terminal (issue #15): the run dir at start and end, each log line once (no
    # second copy from Lightning's own stderr handler), no library tips, the stage-2 row names
    # the objective that ran (cooling off = dpo), a step/max_steps bar per stage, outputs the
    # group can read.
    assert proc.stdout.count(f"run directory: {tmp_path}") == 2, proc.stdout[-3000:]
    assert "INFO: Seed set to" not in proc.stderr and "💡 Tip" not in proc.stdout + proc.stderr
    assert proc.stdout.count("Seed set to 0") == 2  # the pipeline seeds twice before stage 1
    assert "| cw_dpo | dpo |" in proc.stdout and "| sft_c | sft_c |" in proc.stdout
    assert (
        "cw_dpo · epoch 0" in proc.stdout
        and "step: 2/2" in proc.stdout
        and "v_num" not in proc.stdout
    )
    for f in (
        tmp_path / "results.json",
        tmp_path / "checkpoints" / "cw_dpo_hf" / "model.safetensors",
    ):
        assert f.stat().st_mode & 0o044 == 0o044, f"{f}: {oct(f.stat().st_mode)}"
    assert (tmp_path / "checkpoints" / "cw_dpo_hf").stat().st_mode & 0o055 == 0o055


def test_typo_added_with_plus_fails_before_training(tmp_path, tiny_cache_dir):
    cfg = compose_cfg([*FAST, "+stage.cw_dpo.betaa=0.2"], tmp_path, tiny_cache_dir)
    with pytest.raises(ValueError, match=r"stage.cw_dpo has unknown key\(s\) \['betaa'\]"):
        run_pipeline(cfg)


def test_results_table_shows_the_ground_truth_metrics(fast_run):
    out, res = fast_run
    table = (out / "results.md").read_text()
    for head in (
        "F1 %",
        "CHAIR_i %",
        "CHAIR_s %",
        "POPE F1",
        "malformed %",
        "content ECE",
        "content SCE",
        "gold logp fell %",
    ):
        assert head in table, head
    st = res["stages"]
    assert (
        "disp/chosen_fell" in st["cw_dpo"] and "disp/chosen_fell" not in st["sft_c"]
    )  # needs π_ref
    for m in st.values():
        assert 0.0 <= m["chair_s"] <= 100.0 and 0.0 <= m["pope/yes_ratio"] <= 100.0
