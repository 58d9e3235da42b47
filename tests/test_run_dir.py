"""One run, one directory (docs/reliability.md, issue #15): simultaneous starts get distinct run
dirs; a directory a live run holds is refused before anything is written into it; a dead run's
lock is taken over; `resume=true` without a run to resume is an error. Real processes, no model
(every CLI call here stops before a model loads): a few seconds in all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cwdpo.utils.run_dir import (
    LOCK_NAME,
    RunDirError,
    claim_fresh_dir,
    hold_run_dir,
    release_run_dir,
)

ROOT = Path(__file__).resolve().parent.parent
BAD = "stage.cw_dpo.objective.beta=-1"  # stops the CLI right after the run-dir checks, before any model


def cli(args: list[str], tmp_path: Path, env: dict | None = None) -> subprocess.Popen:
    env = {
        **os.environ,
        "CWDPO_CACHE": str(tmp_path / "cache"),
        **(env or {}),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        [sys.executable, "-m", "cwdpo.train", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.subprocess
def test_simultaneous_starts_get_their_own_run_dirs(tmp_path):
    """The issue's `for s in 1 2; do python -m cwdpo.train seed=$s & done`: with a timestamp
    that is the same for both (`${now:%Y}`), each run still gets its own directory."""
    pattern = str(tmp_path / "runs" / "${now:%Y}")
    procs = [cli([f"seed={s}", BAD, f"hydra.run.dir={pattern}"], tmp_path) for s in (1, 2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 1 and BAD in err, err
    dirs = sorted((tmp_path / "runs").iterdir())
    year = time.strftime("%Y")
    assert [d.name for d in dirs] == [year, f"{year}_1"]
    seeds = sorted(
        next(
            ln for ln in (d / ".hydra" / "overrides.yaml").read_text().splitlines() if "seed=" in ln
        )
        for d in dirs
    )
    assert seeds == ["- seed=1", "- seed=2"]  # one run per directory
    assert not [d for d in dirs if (d / LOCK_NAME).exists()]  # released at exit


@pytest.mark.subprocess
def test_simultaneous_multiruns_get_their_own_sweep_dirs(tmp_path):
    pattern = str(tmp_path / "sweeps" / "${now:%Y}")
    procs = [
        cli(["-m", f"seed={s},{s + 10}", BAD, f"hydra.sweep.dir={pattern}"], tmp_path)
        for s in (1, 2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 1 and BAD in err, err
    year = time.strftime("%Y")
    sweeps = sorted((tmp_path / "sweeps").iterdir())
    assert [d.name for d in sweeps] == [year, f"{year}_1"]
    first_seeds = sorted(
        (d / "0" / ".hydra" / "overrides.yaml").read_text().splitlines()[0] for d in sweeps
    )
    assert first_seeds == ["- seed=1", "- seed=2"]  # each sweep's jobs in its own dir


def test_claim_fresh_dir_never_returns_an_existing_dir(tmp_path):
    base = tmp_path / "2026-01-01_00-00-00"
    got = [claim_fresh_dir(base) for _ in range(3)]
    assert [p.name for p in got] == [base.name, f"{base.name}_1", f"{base.name}_2"]


@pytest.mark.subprocess
def test_a_live_run_dir_is_refused_before_anything_is_written(tmp_path):
    run = tmp_path / "shared"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from cwdpo.utils.run_dir import hold_run_dir; "
            f"hold_run_dir({str(run)!r}); print('held', flush=True); time.sleep(120)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        second = cli([f"hydra.run.dir={run}"], tmp_path)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 1
        msg = [ln for ln in err.splitlines() if "in use by a live run" in ln]
        assert len(msg) == 1 and f"pid {holder.pid}" in msg[0] and str(run) in msg[0], err
        assert "Traceback" not in err
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # no .hydra, no train.log
        with pytest.raises(RunDirError, match="in use by a live run"):
            hold_run_dir(run)  # in-process too (what cwdpo.train does for resume=<dir>)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died without releasing (SIGKILL): its lock is stale and is taken over.
    third = cli([f"hydra.run.dir={run}", BAD], tmp_path)
    _, err = third.communicate(timeout=120)
    assert third.returncode == 1 and BAD in err and "in use" not in err, err
    assert "taking over the lock of a run that is gone" in (run / "train.log").read_text()
    assert (run / ".hydra").is_dir()


def test_lock_is_reentrant_and_released(tmp_path):
    lock = hold_run_dir(tmp_path)
    assert lock == hold_run_dir(tmp_path) and lock.is_file()
    release_run_dir(tmp_path)
    assert not lock.exists()


@pytest.mark.subprocess
def test_read_only_run_dir_is_one_clear_line(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        p = cli([f"hydra.run.dir={ro / 'run'}"], tmp_path)
        _, err = p.communicate(timeout=120)
    finally:
        ro.chmod(0o755)
    assert p.returncode == 1 and "is not writable" in err and "Traceback" not in err, err


@pytest.mark.subprocess
def test_unwritable_run_dir_and_cache_are_one_clear_line_each(tmp_path):
    """Also as root (where chmod does not bite): a path below a regular file cannot be created."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    p = cli([f"hydra.run.dir={blocker / 'run'}"], tmp_path)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "Traceback" not in err, err
    assert f"run directory {blocker / 'run'} is not writable (NotADirectoryError" in err
    env = {"CWDPO_CACHE": str(blocker / "cache")}
    p = cli([f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env=env)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1 and "Traceback" not in err, err
    assert (
        f"cache directory (paths.cache_dir, where the tiny VLM is built) {blocker / 'cache'} is not writable"
        in err
    )
    assert "InterpolationResolutionError" not in err


@pytest.mark.subprocess
def test_resume_true_without_a_run_to_resume_is_an_error(tmp_path):
    logs = tmp_path / "logs"
    p = cli(["resume=true", f"paths.log_dir={logs}"], tmp_path)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1, err
    line = [ln for ln in err.splitlines() if "holds no earlier run" in ln]
    assert len(line) == 1 and "resume=true resumes the run in hydra.run.dir" in line[0], err
    assert "resume=<run dir>" in line[0] and "Traceback" not in err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    assert not list(logs.rglob("config.json"))  # no fresh run was started
