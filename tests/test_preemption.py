"""Preemption as clusters do it (docs/reliability.md, "Interruptions and legible failures").

A real `python -m cwdpo.train` process gets SIGTERM mid-stage-2 (sent to itself by the test-only
hook `CWDPO_FAULT_KILL_AT=cw_dpo:1` + `CWDPO_FAULT_SIGNAL=SIGTERM`, at the start of step 2: no
sleeps). It must exit non-zero, leave a checkpoint at the step it stopped (the periodic ones are
off), a marker and a log line with the exact resume command; running that command finishes the
run with the weights of an uninterrupted one (tests/test_resume.py's reference run, same
arguments). SIGUSR1 (SLURM's requeue signal) and Ctrl-C take the same path, checked in-process.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from tests.test_resume import ARGS, KILL_ENV, STAGES, _strip_timing, pipeline_runs

SIGNAL_ENV = "CWDPO_FAULT_SIGNAL"
NO_PERIODIC = "callbacks.model_checkpoint.every_n_train_steps=1000"  # only the preemption saves


def cli(args: list[str], env: dict[str, str], log: Path) -> int:
    """`python -m cwdpo.train *args` as a real process (its own signal handling, exit code)."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), **env}
    with log.open("w") as f:
        return subprocess.run(
            [sys.executable, "-m", "cwdpo.train", *args], env=full, stdout=f, stderr=f
        ).returncode


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, tiny_vlm_path) -> dict[str, Any]:
    cache = Path(tiny_vlm_path).parent
    ref = pipeline_runs(tmp_path_factory, cache)["ref"]  # uninterrupted, same ARGS
    root = tmp_path_factory.mktemp("preempt")
    run = root / "run"
    common = [*ARGS, f"paths.cache_dir={cache}", NO_PERIODIC]
    env = {KILL_ENV: "cw_dpo:1", SIGNAL_ENV: "SIGTERM"}
    rc = cli([*common, f"hydra.run.dir={run}"], env, root / "killed.out")
    out: dict[str, Any] = {"ref": ref, "run": run, "rc": rc, "root": root}
    out["log"] = (run / "train.log").read_text() if (run / "train.log").is_file() else ""
    out["stdout"] = (root / "killed.out").read_text()
    marker = run / "interrupted.json"
    out["marker"] = json.loads(marker.read_text()) if marker.is_file() else None
    ckpt = run / "checkpoints" / "cw_dpo" / "last.ckpt"
    if ckpt.is_file():
        from cwdpo.utils.checkpoint_io import safe_torch_load

        out["ckpt_step"] = safe_torch_load(ckpt)["global_step"]
    if out["marker"] is None:
        return out
    cmd = shlex.split(out["marker"]["resume"])
    assert cmd[:3] == ["python", "-m", "cwdpo.train"], cmd
    args = cmd[3:]
    # A changed training value is refused before anything loads (and changes nothing).
    out["changed_rc"] = cli(
        [*args, "stage.cw_dpo.objective.beta=0.5", f"hydra.run.dir={root / 'r0'}"],
        {},
        root / "changed.out",
    )
    # A truncated last.ckpt (a partial copy): one line naming it and what to do.
    broken = root / "broken"
    shutil.copytree(run, broken)
    half = broken / "checkpoints" / "cw_dpo" / "last.ckpt"
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    out["broken"] = broken
    out["broken_rc"] = cli(
        [*args, f"resume={broken}", f"hydra.run.dir={root / 'r1'}"], {}, root / "broken.out"
    )
    # The command the marker gives, run as given (+ where Hydra logs).
    out["resume_rc"] = cli([*args, f"hydra.run.dir={root / 'r2'}"], {}, root / "r2.out")
    return out


@pytest.mark.subprocess
def test_sigterm_mid_stage_exits_nonzero_with_a_checkpoint_at_that_step(preempted):
    p = preempted
    assert p["rc"] == 128 + signal.SIGTERM, p["stdout"][-3000:]
    assert p.get("ckpt_step") == 2  # signalled at the start of step 2: that step finishes
    m = p["marker"]
    assert m is not None and m["signal"] == "SIGTERM" and m["stage"] == "cw_dpo" and m["step"] == 2
    assert m["checkpoint"] == str(p["run"] / "checkpoints" / "cw_dpo" / "last.ckpt")
    assert f"resume={p['run']}" in m["resume"] and NO_PERIODIC in m["resume"]
    # One line on stderr says it, and it is the last line of the run dir's train.log too.
    assert m["resume"] in p["stdout"].strip().splitlines()[-1]
    last = p["log"].strip().splitlines()[-1]
    assert "stopped: SIGTERM" in last and "stage cw_dpo" in last and m["resume"] in last, last


@pytest.mark.subprocess
def test_resuming_a_preempted_run_ends_with_the_uninterrupted_weights(preempted):
    from safetensors.torch import load_file

    p = preempted
    assert p.get("resume_rc") == 0, (p["root"] / "r2.out").read_text()[-3000:]
    assert not (p["run"] / "interrupted.json").exists()  # finished: the marker is gone
    assert (
        (p["run"] / "train.log")
        .read_text()
        .strip()
        .splitlines()[-1]
        .endswith(f"run finished: {p['run'] / 'results.json'}")
    )
    a = json.loads((p["ref"] / "results.json").read_text())["stages"]
    b = json.loads((p["run"] / "results.json").read_text())["stages"]
    assert _strip_timing(b["cw_dpo"]) == _strip_timing(a["cw_dpo"])
    for stage in STAGES:
        wa = load_file(p["ref"] / "checkpoints" / f"{stage}_hf" / "model.safetensors")
        wb = load_file(p["run"] / "checkpoints" / f"{stage}_hf" / "model.safetensors")
        assert [k for k in wa if not torch.equal(wa[k], wb[k])] == [], stage


def _last_line(path: Path) -> str:
    """The last line a CLI run printed, Hydra's `HYDRA_FULL_ERROR` hint aside."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return [ln for ln in lines if not ln.startswith("Set the environment variable HYDRA")][-1]


@pytest.mark.subprocess
def test_a_changed_training_value_on_resume_is_refused_in_one_line(preempted):
    p = preempted
    out = (p["root"] / "changed.out").read_text()
    assert p["changed_rc"] == 1, out[-3000:]
    msg = _last_line(p["root"] / "changed.out")
    assert "stage.cw_dpo.objective.beta: 0.1 → 0.5" in msg and "resume_overrides=allow" in msg
    assert "paths." not in msg and "hydra." not in msg  # run identity is no change
    assert "Traceback" not in out
    assert "Seed set" not in out  # refused before the pipeline starts (seeds, then the model)
    assert not (p["run"] / "config_history").exists()  # the refused attempt recorded nothing


@pytest.mark.subprocess
def test_a_truncated_checkpoint_names_its_path_and_what_to_do(preempted):
    p = preempted
    out = (p["root"] / "broken.out").read_text()
    ckpt = p["broken"] / "checkpoints" / "cw_dpo" / "last.ckpt"
    last = _last_line(p["root"] / "broken.out")
    assert p["broken_rc"] == 1 and "Traceback" not in out, out[-3000:]
    assert str(ckpt) in last and "delete it" in last and "stage cw_dpo" in last, last
    # and the run dir's train.log ends with why the run stopped
    assert _last_line(p["broken"] / "train.log").endswith(last), _last_line(
        p["broken"] / "train.log"
    )


# ----------------------------------------------------------------------------- in-process
def _fit(path, root: Path, sig: str, steps: int = 3) -> tuple[L.Trainer, BaseException | None]:
    """SFT on the tiny model with the preemption callback and handlers; `sig` sent to this
    process at the start of step 2 (global_step 1)."""
    from cwdpo.callbacks.faults import KillAt
    from cwdpo.callbacks.preemption import PreemptionCheckpoint
    from cwdpo.model.backbone import VLMBackbone
    from cwdpo.utils.checkpoint_io import AtomicCheckpointIO
    from cwdpo.utils.signals import install_signal_handlers
    from tests.helpers import cpu_trainer, shapes_sft

    torch.manual_seed(0)
    backbone = VLMBackbone.from_pretrained(path, max_length=128)
    sizes = {"train": 8, "val": 2, "test": 2, "probe": 2}
    module, dm = shapes_sft(backbone, sizes, steps, lr=1e-3, batch_size=2)
    cbs = [PreemptionCheckpoint("sft_c"), KillAt("sft_c", "sft_c:1", signal_name=sig)]
    trainer = cpu_trainer(root, steps, cbs, plugins=[AtomicCheckpointIO()])
    restore = install_signal_handlers()
    try:
        trainer.fit(module, datamodule=dm)
    except BaseException as e:  # SIGTERMException is a SystemExit
        return trainer, e
    finally:
        restore()
    return trainer, None


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGINT"])
def test_requeue_signal_and_ctrl_c_stop_at_the_step_end_with_a_checkpoint(
    sig, tiny_vlm_path, tmp_path
):
    from cwdpo.utils.checkpoint_io import safe_torch_load
    from cwdpo.utils.signals import interruption

    trainer, err = _fit(tiny_vlm_path, tmp_path, sig)
    assert err is not None and trainer.global_step == 2  # stopped after the step it was in
    info = interruption(err)
    assert info is not None and info.signal == sig and info.stage == "sft_c" and info.step == 2
    ckpt = tmp_path / "checkpoints" / "sft_c" / "last.ckpt"
    assert info.checkpoint == ckpt and safe_torch_load(ckpt)["global_step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_a_failed_preemption_save_is_said_and_the_stop_still_reported(
    tiny_vlm_path, tmp_path, monkeypatch
):
    """A full disk while saving the preemption checkpoint: the stop stays a signal stop (rc
    128 + signal from cwdpo.train) whose line says no checkpoint was saved, and why."""
    from cwdpo.run.outcome import stopped
    from cwdpo.utils.signals import interruption

    def full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(L.Trainer, "save_checkpoint", full)
    trainer, err = _fit(tiny_vlm_path, tmp_path, "SIGTERM")
    info = interruption(err)
    assert info is not None and info.checkpoint is None and "No space left" in info.error
    line = stopped(tmp_path, info)
    assert "no checkpoint at this point (saving one failed: [Errno 28] No space left" in line
    assert not (tmp_path / "checkpoints" / "sft_c" / "last.ckpt").exists()


def test_under_slurm_sigusr1_is_left_to_lightnings_auto_requeue(monkeypatch):
    """A SLURM batch job: cwdpo leaves SIGUSR1 free, so Lightning's connector installs its
    requeue handler (checkpoint + `scontrol requeue`); SIGTERM chains Lightning's handlers and
    cwdpo's."""
    from cwdpo.utils.signals import _handler, install_signal_handlers

    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "42"}
    slurm |= {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    usr1 = signal.getsignal(signal.SIGUSR1)
    restore = install_signal_handlers()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    try:
        assert signal.getsignal(signal.SIGUSR1) is usr1  # not taken by cwdpo
        trainer._signal_connector.register_signal_handlers()
        names = {
            s: [getattr(f, "__name__", "") for f in signal.getsignal(s).signal_handlers]
            for s in (signal.SIGUSR1, signal.SIGTERM)
        }
    finally:
        trainer._signal_connector.teardown()
        restore()
    assert names[signal.SIGUSR1] == ["_slurm_sigusr_handler_fn"]
    assert (
        names[signal.SIGTERM][0] == "_sigterm_notifier_fn"
        and _handler.__name__ in names[signal.SIGTERM]
    )
