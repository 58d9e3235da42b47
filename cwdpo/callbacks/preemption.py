"""Preemption as clusters do it: SIGTERM (SLURM preemption, `kill`), SIGUSR1 (SLURM's requeue
signal) and Ctrl-C stop training at the end of the step in progress, with a resumable
checkpoint of that step (`<run>/checkpoints/<stage>/last.ckpt`, what `resume=<run dir>` reads).

Built on Lightning's own mechanism, not beside it: Lightning's `_SignalConnector` turns SIGTERM
into `trainer.received_sigterm`, and its loops raise `SIGTERMException` at the next step
boundary (a `SystemExit` with code None: rc 0, the bug this module fixes with `cwdpo.train`).
`install_signal_handlers` adds a process-wide handler that Lightning chains behind its own
during `fit` (it keeps existing SIGTERM handlers); during `fit` it only records the signal and,
for SIGINT / SIGUSR1, sets the same flag, so all three stop at the same point. A second Ctrl-C
stops at once (no checkpoint). Outside `fit` (evaluation, saving, loading) the handler raises
`Interrupted`, so the run still stops with a reason and a non-zero code.

Under SLURM with Lightning's auto-requeue (a batch job, `SLURMEnvironment.detect()`), SIGUSR1 is
left to Lightning: it saves `hpc_ckpt_<n>.ckpt` in the run dir and runs `scontrol requeue`;
the SIGTERM SLURM sends next takes the path above. The requeued job needs `resume=<run dir>`
(the marker `interrupted.json` and the log's last line give the exact command).
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

MARKER = "interrupted.json"


class Interrupted(BaseException):
    """A stop signal outside a training loop; like KeyboardInterrupt, not an `Exception`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Interruption:
    """What stopped a run by signal: the signal, the stage and step, the checkpoint saved."""

    signal: str
    stage: str | None = None
    step: int | None = None
    checkpoint: Path | None = None


_STATE: dict[str, Any] = {"signal": None, "trainer": None, "saved": None}


def _handler(signum: int, frame: FrameType | None) -> None:
    again = _STATE["signal"] is not None
    _STATE["signal"] = signum
    trainer = _STATE["trainer"]
    if trainer is None:
        raise Interrupted(signum)
    if signum == signal.SIGINT and again:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None:  # Lightning's flag: its loops stop at the next step boundary
        connector.received_sigterm = True
    log.warning(
        "%s received: stopping at the end of step %d and saving a checkpoint there%s",
        signal.Signals(signum).name,
        trainer.global_step + 1,
        " (Ctrl-C again to stop now, without one)" if signum == signal.SIGINT else "",
    )


def install_signal_handlers() -> Any:
    """Handle SIGTERM, SIGINT and (unless Lightning's SLURM auto-requeue owns it) SIGUSR1 for
    this process; returns a function that puts the previous handlers back."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    signals = [signal.SIGTERM, signal.SIGINT]
    if not SLURMEnvironment.detect():  # Lightning installs its requeue handler only when free
        signals.append(signal.SIGUSR1)
    _STATE.update(signal=None, trainer=None, saved=None)
    old = {s: signal.signal(s, _handler) for s in signals}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore


class PreemptionCheckpoint(L.Callback):
    """On Lightning's step-boundary stop (`SIGTERMException`), save the stage's `last.ckpt`
    at the current step, atomically (the trainer's CheckpointIO), on every rank (the strategy
    decides who writes). Lightning's `OnExceptionCheckpoint` does the same into another file;
    this one is where `resume` looks, and the stage's ModelCheckpoint is told it wrote it."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _STATE["trainer"] = trainer

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _STATE["trainer"] = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        _STATE["trainer"] = None  # from here on a signal raises `Interrupted`
        if not isinstance(exception, SIGTERMException):
            return  # an error, or a second Ctrl-C mid-step: no consistent state to save
        cb = trainer.checkpoint_callback
        ckpt_dir = Path(
            getattr(cb, "dirpath", None)
            or Path(trainer.default_root_dir) / "checkpoints" / self.stage
        )
        path = ckpt_dir / "last.ckpt"
        if cb is not None and hasattr(cb, "last_model_path"):
            cb.last_model_path = str(path)  # restored on resume: it keeps writing last.ckpt
        trainer.save_checkpoint(path)
        _STATE["saved"] = Interruption(_signal_name(), self.stage, int(trainer.global_step), path)
        log.warning(
            "stage %s: checkpoint at step %d saved to %s", self.stage, trainer.global_step, path
        )


def _signal_name() -> str:
    signum = _STATE["signal"]
    return signal.Signals(signum).name if signum is not None else "SIGTERM"


def interruption(exc: BaseException | None) -> Interruption | None:
    """What `exc` says about a signal stop (None: not one). SIGTERMException without a
    signal this module saw: SIGTERM delivered to Lightning alone (cwdpo used as a library)."""
    if isinstance(exc, SIGTERMException):
        return _STATE["saved"] or Interruption(_signal_name())
    if isinstance(exc, Interrupted):
        return Interruption(signal.Signals(exc.signum).name)
    if isinstance(exc, KeyboardInterrupt):
        return Interruption("SIGINT")
    return None


__all__ = [
    "MARKER",
    "Interrupted",
    "Interruption",
    "PreemptionCheckpoint",
    "install_signal_handlers",
    "interruption",
]
