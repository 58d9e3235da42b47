"""Logging and diagnostics never stop training; the pipeline's W&B run is always closed.

- histograms of exactly the inputs that broke wandb/numpy (near-constant float32, constant,
  NaN/inf, empty);
- a failing logger / histogram / CSV / plot write is one warning and a count in results.json,
  and the run finishes;
- the W&B run is closed on error and on Ctrl-C, a run the pipeline did not open is left alone,
  and a resumed run continues the same W&B run id;
- end to end with `logger=wandb` offline: Δlogp curves of all three stages, the cooling-weight
  histograms and the sample-caption tables are in the offline run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from cwdpo.utils.safe_log import FAILURES, LogFailures, guard_logger, histogram_bins

# At the first CW-DPO step policy = reference, so every a = σ(β·margin) is ≈ 0.5: the batch
# that made `wandb.Histogram(a, num_bins=20)` raise "Too many bins for data range".
NEAR_CONSTANT = np.array([0.5, 0.5, 0.5, 0.49999982], dtype=np.float32)


# ----------------------------------------------------------------------------- histograms
def test_the_batch_that_broke_numpy_still_breaks_plain_numpy():
    """Guards the regression input: if numpy ever accepts it, this input tests nothing."""
    with pytest.raises(ValueError, match="Too many bins"):
        np.histogram(NEAR_CONSTANT, bins=20)


@pytest.mark.parametrize(
    "values, n",
    [
        (NEAR_CONSTANT, 4),
        (np.full(7, 0.25, dtype=np.float32), 7),  # exactly constant
        (np.array([1.0, np.nan, 2.0, np.inf, -np.inf, 3.0]), 3),  # non-finite entries dropped
        (np.array([1e9, 1e9 + 1e-3]), 2),  # a range below float resolution at a large magnitude
        (np.linspace(0, 1, 100), 100),
    ],
)
def test_histogram_bins_count_every_finite_value_in_increasing_bins(values, n):
    counts, edges = histogram_bins(values, num_bins=20)
    assert len(counts) == 20 and len(edges) == 21
    assert np.all(np.diff(edges) > 0)
    assert counts.sum() == n
    finite = values[np.isfinite(values)].astype(np.float64)
    assert edges[0] <= finite.min() and finite.max() <= edges[-1]


@pytest.mark.parametrize("values", [np.array([]), np.array([np.nan, np.inf]), np.zeros((0, 3))])
def test_histogram_of_nothing_finite_is_none(values):
    assert histogram_bins(values) is None


def test_wandb_histogram_accepts_the_project_bins():
    from cwdpo.utils.safe_log import wandb_histogram

    h = wandb_histogram(NEAR_CONSTANT)
    assert sum(h.histogram) == 4 and len(h.bins) == 21
    assert wandb_histogram(np.array([np.nan])) is None


# ----------------------------------------------------------------------------- the guard
class _Broken:
    def __init__(self) -> None:
        self.calls = 0

    def log_metrics(self, metrics, step=None):
        self.calls += 1
        raise OSError("disk full")

    def save(self):
        raise RuntimeError("cannot save")


def test_a_guarded_logger_counts_failures_and_warns_once(caplog):
    FAILURES.reset()
    lg = guard_logger(_Broken())
    assert guard_logger(lg) is lg  # idempotent: never wrapped twice
    with caplog.at_level(logging.WARNING, logger="cwdpo.utils.safe_log"):
        for step in range(3):
            lg.log_metrics({"train/loss": 1.0}, step=step)
        lg.save()
    assert lg.calls == 3
    assert FAILURES.snapshot() == {"_Broken.log_metrics": 3, "_Broken.save": 1}
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2  # one warning per failure kind, repeats only counted
    assert "_Broken.log_metrics" in msgs[0] and "OSError: disk full" in msgs[0]
    FAILURES.reset()


def test_since_reports_only_new_failures():
    f = LogFailures()
    f.record("a", ValueError("x"))
    before = f.snapshot()
    f.record("a", ValueError("x"))
    f.record("b", ValueError("y"))
    assert f.since(before) == {"a": 1, "b": 1}


def test_the_guard_lets_ctrl_c_through():
    f = LogFailures()
    with pytest.raises(KeyboardInterrupt), f.guard("x"):
        raise KeyboardInterrupt
    assert f.snapshot() == {}


# ----------------------------------------------------------------------------- pipelines
BASE = [
    "debug=fast",
    "logger=wandb",
    "stage.base_sft.steps=1",
    "stage.sft_c.steps=1",
    "stage.cw_dpo.steps=3",
    "callbacks.probes.n_items=4",
    "callbacks.probes.every_n_steps=1",
    "callbacks.probes.max_cost_frac=null",
    "callbacks.probes.n_samples=2",
    "callbacks.probes.sample_max_new_tokens=4",
    "callbacks.dynamics.histogram_every_n_steps=1",
    "callbacks.dynamics.grad_split_every_n_steps=0",
    "eval.caption_metrics=false",
    "eval.calibration=false",
    "eval.winrate=false",
    "eval.n_records=4",
    "eval.max_new_tokens=4",
]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return tmp_path


def _run(out: Path, cache: Path, *extra: str):
    from hydra import compose, initialize_config_dir

    from cwdpo.run.config import CONFIG_DIR
    from cwdpo.run.pipeline import dump_config, run_pipeline

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[*BASE, f"paths.output_dir={out}", f"paths.cache_dir={cache}", *extra],
        )
    if not (out / "config.json").is_file():
        dump_config(cfg, out)
    return run_pipeline(cfg)


def _offline_runs(out: Path) -> list[dict]:
    from cwdpo.callbacks.wandb_logger import offline_run_dirs, read_offline_run

    return [{"dir": d, **read_offline_run(d)} for d in offline_run_dirs(out)]


def _no_run_left_open(out: Path) -> bool:
    from cwdpo.callbacks import wandb_logger

    return wandb_logger._key(out) not in wandb_logger._OPEN


@pytest.fixture(scope="module")
def wandb_pipeline(tiny_cache_dir, tiny_vlm_path, tmp_path_factory):
    """All three stages with logger=wandb (offline), parsed from the offline run file."""
    root = tmp_path_factory.mktemp("wandb_e2e")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_DIR", str(root))
    try:
        results = _run(root / "run", tiny_cache_dir)
    finally:
        mp.undo()
    return root / "run", results, _offline_runs(root / "run")


def _table(run: dict, rows: list[dict], key: str) -> dict:
    """The last table logged under `key` (history rows hold only its file's path)."""
    path = [r[f"{key}/path"] for r in rows if f"{key}/path" in r][-1]
    return json.loads((run["dir"] / "files" / path).read_text())


def test_wandb_run_holds_curves_histograms_and_tables_of_every_stage(wandb_pipeline):
    out, results, runs = wandb_pipeline
    assert results["logging_failures"] == {}
    assert len(runs) == 1 and runs[0]["complete"]
    run = runs[0]
    rows = run["history"]
    keys = set().union(*rows)
    for stage, steps in (("base_sft", 1), ("sft_c", 1), ("cw_dpo", 3)):
        assert f"{stage}/probe/positives/mean" in keys
        curve = _table(run, rows, f"{stage}/probe/delta_logp_table")  # Δlogp per probe group
        assert curve["columns"] == ["step", "lineKey", "lineVal"]
        assert {k for _, k, _ in curve["data"]} >= {"positives", "gentle", "easy"}
        assert {s for s, _, _ in curve["data"]} == set(range(steps + 1))  # start … last step
        samples = _table(run, rows, f"{stage}/samples/captions")
        assert samples["columns"] == ["image", "image_id", "reference", "generated", "score"]
        assert len(samples["data"]) == 2
    whole = _table(run, rows, "run/probe/delta_logp_table")  # the run-wide curve, all stages
    assert max(s for s, _, _ in whole["data"]) == 1 + 1 + 3
    hist = [
        (r["cw_dpo/dynamics/cooling_weights/values"], r["cw_dpo/dynamics/dpo_a/bins"])
        for r in rows
        if "cw_dpo/dynamics/cooling_weights/values" in r
    ]
    assert len(hist) == 3  # every step, step 0 included (every a ≈ 0.5 there)
    for counts, _ in hist:
        assert sum(counts) == 4  # one cooling weight per pair of the batch
    assert hist[0][1][0] <= 0.5 <= hist[0][1][-1]
    assert run["summary"]["stages/cw_dpo/steps"] == 3
    assert _no_run_left_open(out)


def test_failing_logging_is_counted_and_training_goes_on(
    tiny_cache_dir, tiny_vlm_path, wandb_env, monkeypatch, caplog
):
    import wandb
    from lightning.pytorch.loggers import CSVLogger

    import cwdpo.analysis.dynamics_plots

    def broken_histogram(*a, **k):
        raise ValueError("Too many bins for data range")

    real = CSVLogger.log_metrics

    def flaky_csv(self, metrics, step=None):
        if "probe/seconds" in metrics:
            raise OSError("No space left on device")
        return real(self, metrics, step)

    def broken_plot(run):
        raise RuntimeError("matplotlib exploded")

    monkeypatch.setattr(wandb, "Histogram", broken_histogram)
    monkeypatch.setattr(CSVLogger, "log_metrics", flaky_csv)
    monkeypatch.setattr(cwdpo.analysis.dynamics_plots, "plot_run", broken_plot)
    out = wandb_env / "run"
    with caplog.at_level(logging.WARNING):
        results = _run(out, tiny_cache_dir)
    assert [s for s in results["stages"]] == ["start", "base_sft", "sft_c", "cw_dpo"]
    assert results["stages"]["cw_dpo"]["steps"] == 3
    fails = json.loads((out / "results.json").read_text())["logging_failures"]
    assert fails["dynamics histograms"] == 3
    assert (
        fails["ResumableCSVLogger.log_metrics"] >= 3 * 2
    )  # every probe of every stage (conf/logger/csv.yaml)
    assert any(k.startswith("plots of") for k in fails)
    assert results["stages"]["cw_dpo"]["logging_failures"]["dynamics histograms"] == 3
    warned = [r.getMessage() for r in caplog.records if "training goes on" in r.getMessage()]
    assert len(warned) == 3  # one per kind of failure, not one per step
    assert any("Too many bins" in m for m in warned)
    assert _no_run_left_open(out)


def test_wandb_run_is_closed_on_error_and_resume_continues_it(
    tiny_cache_dir, tiny_vlm_path, wandb_env, monkeypatch
):
    """A crash in stage 2 closes the run (and leaves a user's own run alone); resuming the run
    dir continues the same W&B run id instead of starting a second run."""
    import wandb

    from cwdpo.stages import CWDPOModule

    user = wandb.init(project="mine", dir=str(wandb_env), mode="offline")  # the global wandb.run
    real_step = CWDPOModule.training_step

    def crash(self, batch, batch_idx):
        if self.global_step == 1:
            raise RuntimeError("CUDA error: an illegal memory access")
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(CWDPOModule, "training_step", crash)
    out = wandb_env / "run"
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _run(out, tiny_cache_dir, "callbacks.model_checkpoint.every_n_train_steps=1")
    assert _no_run_left_open(out)
    first = _offline_runs(out)
    assert len(first) == 1 and first[0]["complete"]  # closed: the exit record is written
    rid = (out / "wandb_run_id").read_text().strip()
    assert first[0]["dir"].name.endswith(rid) and rid != user.id
    assert wandb.run is user and not user._is_finished  # never touched

    monkeypatch.setattr(CWDPOModule, "training_step", real_step)
    results = _run(
        out, tiny_cache_dir, "callbacks.model_checkpoint.every_n_train_steps=1", f"resume={out}"
    )
    assert results["stages"]["cw_dpo"]["steps"] == 3
    runs = _offline_runs(out)
    assert len(runs) == 2 and all(r["complete"] for r in runs)
    assert {r["dir"].name.rsplit("-", 1)[1] for r in runs} == {rid}  # the same W&B run
    resumed = next(r for r in runs if r["dir"] != first[0]["dir"])
    steps = sorted(r["cw_dpo/step"] for r in resumed["history"] if "cw_dpo/step" in r)
    assert steps and steps[0] >= 1 and steps[-1] == 3  # continues from the checkpoint
    assert not any("base_sft/step" in r for r in resumed["history"])  # finished stages skipped
    assert wandb.run is user and not user._is_finished
    user.finish()


def test_wandb_run_is_closed_on_ctrl_c(tiny_cache_dir, tiny_vlm_path, wandb_env, monkeypatch):
    import cwdpo.run.pipeline

    calls = {"n": 0}
    real = cwdpo.run.pipeline.evaluate_captioning

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the evaluation after base SFT
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(cwdpo.run.pipeline, "evaluate_captioning", interrupted)
    out = wandb_env / "run"
    with pytest.raises(KeyboardInterrupt):
        _run(out, tiny_cache_dir, "stage.run=[base_sft,sft_c]")
    assert _no_run_left_open(out)
    runs = _offline_runs(out)
    assert len(runs) == 1 and runs[0]["complete"]
    assert os.environ.get("WANDB_MODE") == "offline"
