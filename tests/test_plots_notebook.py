"""A two-stage pipeline run with probes, dynamics and W&B offline: early-stop reason in the
results, one wandb run for both stages, PNG plots in the run dir, overlays from
`python -m cwdpo.plot`, and the review notebook executed end to end (so it cannot rot)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def _non_empty_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.is_file() and path.read_bytes()[:8] == PNG, path
    img = imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100 and img[..., :3].std() > 0.01, path


@pytest.fixture(scope="module")
def pipeline_run(tiny_cache_dir, tiny_vlm_path, tmp_path_factory):
    """sft_c (1 step) → cw_dpo, where a probe rule that always holds ends cw_dpo at step 1."""
    import os

    from hydra import compose, initialize_config_dir

    from cwdpo.run.config import CONFIG_DIR
    from cwdpo.run.pipeline import dump_config, run_pipeline

    out = tmp_path_factory.mktemp("runs") / "cw_dpo_run"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(out.parent), "WANDB_SILENT": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    overrides = [
        "debug=fast",
        "logger=wandb",
        "stage.run=[sft_c,cw_dpo]",
        "stage.sft_c.steps=1",
        "stage.cw_dpo.steps=4",
        "callbacks.probes.n_items=4",
        f"paths.output_dir={out}",
        f"paths.cache_dir={tiny_cache_dir}",
        "eval.caption_metrics=false",
        "eval.calibration=false",
        "eval.winrate=false",
        "eval.n_records=4",
        "callbacks.probes.every_n_steps=1",
        "callbacks.probes.max_cost_frac=null",
        "callbacks.probes.n_samples=2",
        "callbacks.probes.sample_max_new_tokens=6",
        "callbacks.dynamics.grad_split_every_n_steps=1",
        "~callbacks.model_checkpoint",
        "+callbacks.probes.rules.always={kind: above, group: positives, stat: ell, "
        "threshold: -1.0e9, stages: [cw_dpo], min_step: 1}",
    ]
    try:
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        dump_config(cfg, out)
        results = run_pipeline(cfg)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out, results


def test_results_hold_the_early_stopping_reason(pipeline_run):
    out, results = pipeline_run
    saved = json.loads((out / "results.json").read_text())
    cw, sft = saved["stages"]["cw_dpo"], saved["stages"]["sft_c"]
    assert sft["early_stop"] is None and sft["steps"] == 1
    assert cw["early_stop"].startswith("always: positives ell") and cw["steps"] == 1
    assert cw["probe_events"][0]["rule"] == "always"
    assert cw["probe_seconds"] > 0 and 0 < cw["probe_cost_frac"] < 1
    stages = json.loads((out / "stages.json").read_text())
    assert [(s["stage"], s["offset"], s["steps"]) for s in stages] == [
        ("sft_c", 0, 1),
        ("cw_dpo", 1, 1),
    ]


def test_one_wandb_run_for_the_whole_pipeline(pipeline_run):
    from cwdpo.callbacks.wandb_logger import offline_run_dirs, read_offline_run

    out, _ = pipeline_run
    runs = offline_run_dirs(out)
    assert len(runs) == 1 and runs[0].is_relative_to(out)
    data = read_offline_run(runs[0])
    assert data["complete"]
    keys = set().union(*data["history"])
    for k in (
        "sft_c/step",
        "sft_c/train/loss",
        "sft_c/probe/positives/mean",
        "cw_dpo/step",
        "cw_dpo/probe/positives/mean",
        "cw_dpo/probe/gentle/q90",
        "cw_dpo/dynamics/vulnerable_frac",
        "cw_dpo/gradsplit/norm_l",
        "cw_dpo/gradsplit/cosine",
        "cw_dpo/probe/fired/always",
        "cw_dpo/dynamics/cooling_weights/_type",
    ):
        assert k in keys, k
    assert data["summary"]["stages/cw_dpo/early_stop"].startswith("always:")


def test_plots_in_the_run_dir_and_overlays(pipeline_run, tmp_path):
    from cwdpo.analysis.dynamics import load_runs
    from cwdpo.plot import main

    out, _ = pipeline_run
    for name in ("delta_logp.png", "distributions.png", "dynamics.png"):
        _non_empty_png(out / "plots" / name)
    # a second "run" (a DPO baseline) inside a multirun-like dir: overlays
    multi = tmp_path / "multirun"
    shutil.copytree(out, multi / "0", ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    shutil.copytree(out, multi / "1", ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    cfg = json.loads((multi / "1" / "config.json").read_text())
    (multi / "1" / "config.json").write_text(json.dumps({**cfg, "experiment_name": "dpo"}))
    assert [r.label for r in load_runs([multi])] == ["default", "dpo"]
    written = main([str(multi), "--out", str(tmp_path / "cmp")])
    assert {p.name for p in written} == {"compare_delta_logp.png", "compare_dynamics.png"}
    for p in written:
        _non_empty_png(p)


@pytest.mark.subprocess
def test_review_notebook_executes(pipeline_run, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    out, _ = pipeline_run
    monkeypatch.setenv("CWDPO_RUNS", str(out))
    nb = nbformat.read(ROOT / "notebooks" / "dlogp_review.ipynb", as_version=4)
    NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert (
        sum(o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
        >= 3
    )  # curves, side-by-side, dynamics
    text = "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "always: positives ell" in text  # the early-stop reason is reviewed


def test_notebook_default_run_discovery_skips_plot_folders_and_runs_without_data(
    tmp_path, monkeypatch
):
    """Issue #15: `cwdpo.plot --out logs/train/runs/cmp` (or a run that failed before training,
    leaving only `.hydra/`) was newer than the real runs, so the notebook loaded it and failed."""
    import os
    import sys
    import time

    nb = json.loads((ROOT / "notebooks" / "dlogp_review.ipynb").read_text())
    cell = "".join(nb["cells"][1]["source"])
    runs = tmp_path / "logs" / "train" / "runs"
    real = [runs / "dpo" / "2026-01-01_00-00-00", runs / "cw_dpo" / "2026-01-01_00-00-01"]
    for k, d in enumerate(real):
        d.mkdir(parents=True)
        (d / "probes.csv").write_text("stage,step,group,mean\n")
        os.utime(d, (time.time() - 100 + k, time.time() - 100 + k))
    (runs / "cmp").mkdir()
    (runs / "cmp" / "delta_logp.png").write_bytes(PNG)  # plot output under runs/
    (runs / "default" / "2026-01-02_00-00-00" / ".hydra").mkdir(parents=True)  # failed run
    (tmp_path / "cwdpo").mkdir()  # the notebook walks up to the repo root (a `cwdpo` dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CWDPO_RUNS", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    ns: dict = {}
    exec(compile(cell, "dlogp_review.ipynb[1]", "exec"), ns)
    assert ns["RUNS"] == [str(d) for d in real]
