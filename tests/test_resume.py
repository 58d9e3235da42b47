"""Resume guarantees (docs/reliability.md).

A run SIGKILLed between stages and then mid-stage, resumed twice (once with `resume=<run dir>`,
once with `hydra.run.dir=<run dir> resume=true`), ends with the same results and bitwise-equal
weights as an uninterrupted run (CPU, deterministic settings), and never redoes a finished
stage. Runs are forked from the test process (imports already paid), with on-policy negatives
refreshed every step so the negative buffer, the global RNG and the data order all matter.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

KILL_ENV = "CWDPO_FAULT_KILL_AT"
SECRET = "sk-cwdpo-reliability-test-4f9c2b7e1d"  # in every run's env; must never reach a file
STAGES = ("base_sft", "sft_c", "cw_dpo")
TIMING = ("seconds", "cost_frac")  # wall-clock measurements: the only values allowed to differ
ARGS = [
    "+debug=fast",
    "num_threads=1",
    "trainer.deterministic=true",
    "trainer.limit_val_batches=0",
    "eval.caption_metrics=false",
    "eval.n_records=4",
    "eval.max_new_tokens=6",
    "negatives=mixed",
    "negatives.refresh_every_n_steps=1",
    "negatives.num_samples=1",
    "negatives.max_new_tokens=6",
    "stage.base_sft.steps=2",
    "stage.cw_dpo.steps=3",
    "callbacks.probes.n_items=4",
    "callbacks.probes.n_samples=2",
    "callbacks.dynamics.grad_split_every_n_steps=0",
]

_RUNS: dict[str, Any] = {}


# ----------------------------------------------------------------------------- forked CLI runs
def _child(args: list[str], env: dict[str, str], log: Path) -> None:
    code = 1
    try:
        torch.set_num_threads(1)  # before any op: no OpenMP pool is used across the fork
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.update(env)
        from cwdpo.train import main

        sys.argv = ["cwdpo.train", *args]
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def start_cli(args: list[str], env: dict[str, str], log: Path) -> int:
    """`python -m cwdpo.train *args` in a forked child (so it can be SIGKILLed); returns the pid."""
    import cwdpo.run.pipeline  # noqa: F401  (heavy imports once, in the parent)

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(args, env, log)
    return pid


def wait(pid: int) -> int:
    return os.waitpid(pid, 0)[1]


def _mtimes(run: Path, stage: str) -> dict[str, int]:
    ck = run / "checkpoints"
    return {
        p.name: p.stat().st_mtime_ns
        for p in (ck / f"{stage}.done.json", ck / f"{stage}_hf" / "model.safetensors")
    }


def pipeline_runs(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Any]:
    """The reference run and the killed-and-resumed run, once per session (shared with
    tests/test_safe_loading.py, which checks that SECRET reached no file)."""
    if _RUNS:
        return _RUNS
    root = tmp_path_factory.mktemp("resume")
    ref, run, run2 = root / "ref", root / "run", root / "resume-hydra-dir"
    common = [*ARGS, f"paths.cache_dir={cache_dir}"]
    env = {"OPENAI_API_KEY": SECRET, "WANDB_API_KEY": SECRET, "HF_TOKEN": SECRET}
    logs = {k: root / f"{k}.log" for k in ("ref", "kill1", "kill2", "resume")}
    # Uninterrupted reference (also logging to W&B, offline), in parallel with the killed run.
    p_ref = start_cli(
        [*common, f"hydra.run.dir={ref}", "logger=wandb"],
        {**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
        logs["ref"],
    )
    spans = []  # (fork, reap) wall time of each attempt on `run`: what its recorded time fits in
    # 1. killed between stages: base_sft and sft_c finished, cw_dpo about to start.
    spans.append([time.time()])
    s1 = wait(
        start_cli(
            [*common, f"hydra.run.dir={run}"], {**env, KILL_ENV: "cw_dpo:start"}, logs["kill1"]
        )
    )
    spans[-1].append(time.time())
    m1 = {"base_sft": _mtimes(run, "base_sft"), "sft_c": _mtimes(run, "sft_c")}
    # 2. resume=<run dir>: cw_dpo starts from the saved sft_c policy in a fresh process and is
    #    killed right after its step-1 checkpoint.
    spans.append([time.time()])
    s2 = wait(
        start_cli(
            [*common, f"hydra.run.dir={run2}", f"resume={run}"],
            {**env, KILL_ENV: "cw_dpo:1"},
            logs["kill2"],
        )
    )
    spans[-1].append(time.time())
    m2 = {"base_sft": _mtimes(run, "base_sft"), "sft_c": _mtimes(run, "sft_c")}
    ckpt_path = run / "checkpoints" / "cw_dpo" / "last.ckpt"
    killed_ckpt = None
    if ckpt_path.is_file():
        from cwdpo.utils.checkpoint_io import safe_torch_load

        killed_ckpt = safe_torch_load(ckpt_path)
    s_ref = wait(p_ref)
    # 3. hydra.run.dir=<run dir> resume=true: cw_dpo continues from last.ckpt (step 1).
    spans.append([time.time()])
    s3 = wait(start_cli([*common, f"hydra.run.dir={run}", "resume=true"], env, logs["resume"]))
    spans[-1].append(time.time())
    m3 = {"base_sft": _mtimes(run, "base_sft"), "sft_c": _mtimes(run, "sft_c")}
    _RUNS.update(
        root=root,
        ref=ref,
        run=run,
        run2=run2,
        logs=logs,
        status=(s_ref, s1, s2, s3),
        mtimes=(m1, m2, m3),
        spans=spans,
        killed_ckpt=killed_ckpt,
    )
    return _RUNS


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_vlm_path) -> dict[str, Any]:
    return pipeline_runs(tmp_path_factory, Path(tiny_vlm_path).parent)


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else "<no log>"


def _strip_timing(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _strip_timing(v) for k, v in x.items() if not any(t in k for t in TIMING)}
    if isinstance(x, list):
        return [_strip_timing(v) for v in x]
    return x


# ----------------------------------------------------------------------------- the guarantees
@pytest.mark.subprocess  # forks CLI runs (test_resume.pipeline_runs)
def test_runs_were_killed_where_asked(runs):
    s_ref, s1, s2, s3 = runs["status"]
    logs = runs["logs"]
    assert os.WIFEXITED(s_ref) and os.WEXITSTATUS(s_ref) == 0, _tail(logs["ref"])
    assert os.WIFSIGNALED(s1) and os.WTERMSIG(s1) == signal.SIGKILL, _tail(logs["kill1"])
    assert os.WIFSIGNALED(s2) and os.WTERMSIG(s2) == signal.SIGKILL, _tail(logs["kill2"])
    assert os.WIFEXITED(s3) and os.WEXITSTATUS(s3) == 0, _tail(logs["resume"])
    assert runs["killed_ckpt"] is not None and runs["killed_ckpt"]["global_step"] == 1


@pytest.mark.subprocess  # forks CLI runs (test_resume.pipeline_runs)
def test_resume_mid_stage_gives_bitwise_identical_results(runs):
    from safetensors.torch import load_file

    a = json.loads((runs["ref"] / "results.json").read_text())
    b = json.loads((runs["run"] / "results.json").read_text())
    assert list(a["stages"]) == list(b["stages"]) == ["start", *STAGES]
    for stage in a["stages"]:
        assert _strip_timing(b["stages"][stage]) == _strip_timing(a["stages"][stage]), stage
    # The resumed stage really used refreshed on-policy negatives across the kill.
    assert b["stages"]["cw_dpo"]["negatives"]["refresh_steps"] == [0, 1, 2]
    for stage in STAGES:
        wa = load_file(runs["ref"] / "checkpoints" / f"{stage}_hf" / "model.safetensors")
        wb = load_file(runs["run"] / "checkpoints" / f"{stage}_hf" / "model.safetensors")
        assert wa.keys() == wb.keys()
        diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not diff, f"{stage}: {len(diff)} tensors differ, e.g. {diff[:3]}"


def _csv_rows(run: Path, stage: str) -> list[dict[str, str]]:
    import csv

    with (run / "csv" / stage / "metrics.csv").open(newline="") as f:
        return [
            {k: v for k, v in r.items() if v != "" and not any(t in k for t in TIMING)}
            for r in csv.DictReader(f)
        ]


@pytest.mark.subprocess  # forks CLI runs (test_resume.pipeline_runs)
def test_metrics_history_survives_resume_and_wall_time_counts_every_attempt(runs):
    """Lightning's CSVLogger deleted a resumed stage's metrics.csv (the rows before the
    checkpoint were lost); `wall_seconds` counted only the last attempt. Now every row is
    there once, equal to the uninterrupted run's, and every attempt's time is counted."""

    def at_resume_step(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        # The step-1 on-policy refresh ran (and is in the checkpoint) before the kill; its
        # counters go into step 1's row, which the killed process never wrote: not re-logged.
        return [
            {k: v for k, v in r.items() if not (r["step"] == "1" and k.startswith("on_policy/"))}
            for r in rows
        ]

    for stage in STAGES:
        ref, resumed = _csv_rows(runs["ref"], stage), _csv_rows(runs["run"], stage)
        if stage == "cw_dpo":
            ref, resumed = at_resume_step(ref), at_resume_step(resumed)
        assert resumed == ref, stage
    steps = [r["step"] for r in _csv_rows(runs["run"], "cw_dpo") if "train/loss" in r]
    assert steps == sorted(set(steps), key=int) and len(steps) == 3  # no step lost or repeated
    res = json.loads((runs["run"] / "results.json").read_text())
    attempts = res["attempt_wall_seconds"]
    assert len(attempts) == 3  # kill1, kill2, the resume
    assert res["wall_seconds"] == pytest.approx(sum(attempts))
    # each attempt's time lies within its process's life (fork → reap, measured here) ...
    for t, (forked, reaped) in zip(attempts, runs["spans"]):
        assert 0 < t <= reaped - forked, (attempts, runs["spans"])
    # ... and the first one holds the two stages it trained in full
    stages = res["stages"]
    assert attempts[0] >= stages["base_sft"]["train_seconds"] + stages["sft_c"]["train_seconds"]


@pytest.mark.subprocess  # forks CLI runs (test_resume.pipeline_runs)
def test_killed_between_stages_does_not_redo_finished_stages(runs):
    m1, m2, m3 = runs["mtimes"]
    assert m1 == m2 == m3  # base_sft and sft_c (marker and weights) never rewritten
    second = (runs["run2"] / "train.log").read_text()
    assert "resume: stage base_sft already done" in second
    assert "resume: stage sft_c already done" in second
    assert "stage base_sft done in" not in second and "stage sft_c done in" not in second
    assert "resume: stage cw_dpo continues" not in second  # killed before its first checkpoint
    third = (runs["run"] / "train.log").read_text().split("resume: stage base_sft already done")[-1]
    assert "resume: stage sft_c already done" in third and "stage sft_c done in" not in third
    assert "resume: stage cw_dpo continues from" in third and "last.ckpt" in third


@pytest.mark.subprocess  # forks CLI runs (test_resume.pipeline_runs)
def test_checkpoint_holds_the_state_resume_needs(runs):
    """Optimizer, scheduler, loops (Lightning), data position + RNG + negative buffer and stats
    (datamodule), global RNG and the fault counter (callbacks) — all weights_only-loadable."""
    ck = runs["killed_ckpt"]
    assert ck["optimizer_states"] and ck["lr_schedulers"]
    dm = ck["PreferenceDataModule"]
    assert dm["train_position"] == {"epoch": 0, "batches": 1}
    assert dm["buffer"] and dm["stats"]["refresh_steps"] == [0, 1]
    names = " ".join(ck["callbacks"])
    assert "GlobalRNGState" in names and "NonFiniteGuard" in names and "OnPolicyNegatives" in names


@pytest.mark.subprocess  # forks CLI runs (test_resume.pipeline_runs)
def test_resumed_cw_dpo_reference_is_the_sft_c_policy(runs):
    """The Lightning ckpt leaves the frozen π_ref out and records its signature: that of the
    saved stage-1 output, which the resumed run re-snapshots (and which test_resume_mid_stage
    shows gives bitwise-equal results)."""
    from cwdpo.model.backbone import VLMBackbone
    from cwdpo.model.ref_cache import reference_signature

    saved = VLMBackbone.from_pretrained(runs["run"] / "checkpoints" / "sft_c_hf")
    sft_c = saved.model.state_dict()  # HF files use the legacy key layout: load, then compare
    state = runs["killed_ckpt"]["state_dict"]
    assert not [k for k in state if k.startswith("backbone.reference.")]
    saved.snapshot_reference()
    assert runs["killed_ckpt"]["cwdpo_reference_signature"] == reference_signature(saved)
    policy = {
        k.removeprefix("backbone.model."): v
        for k, v in state.items()
        if k.startswith("backbone.model.")
    }
    assert policy.keys() == sft_c.keys()
    assert any(not torch.equal(policy[k], sft_c[k]) for k in policy)  # the policy moved on


def test_cw_dpo_checkpoint_drops_the_reference_and_checks_it_on_load(backbone, perturb):
    """Save: no reference tensors, its signature instead. Load: the live reference (not the
    policy) goes back in, strict loading passes; another reference is refused, naming why."""
    from functools import partial

    from cwdpo.stages.cw_dpo import CWDPOModule

    backbone.snapshot_reference()
    module = CWDPOModule(backbone, optimizer=partial(torch.optim.SGD, lr=0.1))
    module.setup("fit")
    perturb(backbone.model, 0.01, 2)  # the policy has moved away from π_ref
    full = {k: v.clone() for k, v in module.state_dict().items()}
    ckpt = {"state_dict": dict(full)}
    module.on_save_checkpoint(ckpt)
    n_ref = sum(k.startswith("backbone.reference.") for k in full)
    assert n_ref > 0 and len(ckpt["state_dict"]) == len(full) - n_ref
    module.on_load_checkpoint(ckpt)
    assert ckpt["state_dict"].keys() == full.keys()
    assert all(torch.equal(ckpt["state_dict"][k], full[k]) for k in full)
    module.load_state_dict(ckpt["state_dict"], strict=True)

    perturb(backbone.reference.requires_grad_(True), 0.01, 3)  # another π_ref
    other = CWDPOModule(backbone, optimizer=partial(torch.optim.SGD, lr=0.1))
    other.setup("fit")
    stale = {
        "state_dict": {k: v for k, v in full.items() if not k.startswith("backbone.reference.")},
        "cwdpo_reference_signature": ckpt["cwdpo_reference_signature"],
    }
    with pytest.raises(RuntimeError, match="different reference policy"):
        other.on_load_checkpoint(stale)
    other.on_load_checkpoint(
        {"cwdpo_reference_signature": other.reference_checkpoint.signature}
    )  # DeepSpeed: no state_dict


def test_reference_signature_ignores_storage_dtype_and_sees_changes(backbone, perturb):
    from cwdpo.model.ref_cache import reference_signature

    backbone.snapshot_reference()
    sig = reference_signature(backbone)
    backbone.reference.to(torch.bfloat16)
    bf16 = reference_signature(backbone)
    assert bf16 == sig  # bf16-true precision casts after the signature is taken: same π_ref
    perturb(backbone.reference.requires_grad_(True), 0.05, 4)
    assert reference_signature(backbone) != sig


@pytest.mark.subprocess  # forks CLI runs (test_resume.pipeline_runs)
def test_resumed_probe_deltas_match_the_uninterrupted_run(runs):
    import csv

    def last_rows(path: Path) -> dict[tuple[str, str], float]:
        with path.open() as f:  # the last row per (step, group) wins (a resume may repeat steps)
            return {
                (r["step"], r["group"]): float(r["mean"])
                for r in csv.DictReader(f)
                if r["stage"] == "cw_dpo"
            }

    assert last_rows(runs["run"] / "probes.csv") == last_rows(runs["ref"] / "probes.csv")


# ----------------------------------------------------------------------------- building blocks
def test_sampler_restarts_mid_epoch_and_reshuffles_per_epoch():
    from cwdpo.data.sampler import ResumableSampler

    s = ResumableSampler(10, seed=3, batch_size=4)
    epoch0 = list(s)
    again = ResumableSampler(10, seed=3, batch_size=4)
    again.start_at(epoch=0, batches=1)
    assert list(again) == epoch0[4:]
    s.set_epoch(1)
    assert list(s) != epoch0 and sorted(s) == list(range(10))
    other = ResumableSampler(10, seed=3, batch_size=4)
    other.start_at(epoch=1, batches=0)
    assert list(other) == list(s)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from cwdpo.run.run_state import RunState
    from cwdpo.utils import checkpoint_io as ck

    io_ = ck.AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_.save_checkpoint({"w": torch.arange(4.0), "global_step": 1}, path)

    def crash(obj, f, *a, **k):  # half a file, then the process "dies"
        f.write(b"\x80\x02half")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io_.save_checkpoint({"w": torch.zeros(4), "global_step": 2}, path)
    monkeypatch.undo()
    loaded = io_.load_checkpoint(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind
    # A temp file left behind by a SIGKILL mid-write is never what resume reads.
    state = RunState(tmp_path / "run")
    state.stage_ckpt_dir("sft_c").mkdir(parents=True)
    (state.stage_ckpt_dir("sft_c") / ".last.ckpt.abc.tmp").write_bytes(b"garbage")
    assert state.last_checkpoint("sft_c") is None


def test_result_and_directory_writes_are_atomic(tmp_path, monkeypatch):
    from cwdpo.utils import io

    target = tmp_path / "results.json"
    io.atomic_write_json(target, {"a": 1})

    def crash(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(io.os, "replace", crash)
    with pytest.raises(OSError):
        io.atomic_write_json(target, {"a": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]

    hf = tmp_path / "sft_c_hf"
    io.atomic_save_dir(hf, lambda d: (d / "model.safetensors").write_bytes(b"v1"))

    def half(d: Path) -> None:
        (d / "model.safetensors").write_bytes(b"v2-partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.atomic_save_dir(hf, half)
    assert (hf / "model.safetensors").read_bytes() == b"v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "sft_c_hf"]


def test_stage_marker_needs_the_saved_policy_and_fresh_runs_drop_stale_state(tmp_path):
    from cwdpo.run.run_state import RunState, resume_dir

    st = RunState(tmp_path)
    st.mark_done("sft_c", {"x": 1.0}, ["a"])
    assert not st.is_done("sft_c")  # marker without <stage>_hf: not done
    (st.hf_dir("sft_c")).mkdir(parents=True)
    (st.hf_dir("sft_c") / "config.json").write_text("{}")
    assert st.load_done("sft_c")["metrics"] == {"x": 1.0}
    (st.stage_ckpt_dir("cw_dpo")).mkdir(parents=True)
    (st.stage_ckpt_dir("cw_dpo") / "last.ckpt").write_bytes(b"old")
    st.clear(["sft_c", "cw_dpo"])
    assert not st.is_done("sft_c") and st.last_checkpoint("cw_dpo") is None
    assert resume_dir(None, tmp_path) is None and resume_dir(True, tmp_path) == tmp_path
    assert resume_dir(str(tmp_path), "/elsewhere") == tmp_path
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        resume_dir(str(tmp_path / "missing"), tmp_path)


def test_csv_logger_keeps_rows_before_the_resume_step_and_fresh_runs_drop_them(tmp_path):
    """Unit view of the history guarantee: rows from the resume step on are replaced (never
    duplicated), earlier ones kept, headers merged; a fresh run drops the old file."""
    import csv

    from cwdpo.run.run_state import RunState
    from cwdpo.utils.csv_logger import ResumableCSVLogger

    first = ResumableCSVLogger(tmp_path, name="csv", version="cw_dpo")
    for step in range(5):
        first.log_metrics({"train/loss": float(step)}, step=step)
        first.save()
    path = RunState(tmp_path).csv_file("cw_dpo")
    assert path == Path(first.log_dir) / "metrics.csv"
    resumed = ResumableCSVLogger(tmp_path, name="csv", version="cw_dpo")  # resumed at step 3
    for step in (3, 4, 5):
        resumed.log_metrics({"train/loss": 10.0 + step, "val/loss": 1.0}, step=step)
        resumed.save()
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["train/loss"]) for r in rows] == [
        ("0", "0.0"),
        ("1", "1.0"),
        ("2", "2.0"),
        ("3", "13.0"),
        ("4", "14.0"),
        ("5", "15.0"),
    ]
    assert set(rows[0]) == {"step", "train/loss", "val/loss"} and rows[0]["val/loss"] == ""
    RunState(tmp_path).clear(["cw_dpo"])
    assert not path.exists()
