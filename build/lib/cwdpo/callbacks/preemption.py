"""The checkpoint at a stop signal: SIGTERM (SLURM preemption, `kill`), SIGUSR1 (SLURM's requeue
signal) and Ctrl-C stop training at the end of the step in progress (`cwdpo/utils/signals.py`
sets Lightning's stop flag), and this callback saves that step as the stage's
`<run>/checkpoints/<stage>/last.ckpt`, what `resume=<run dir>` reads.

Built on Lightning's own mechanism, not beside it: Lightning's `_SignalConnector` turns SIGTERM
into `trainer.received_sigterm` and its loops raise `SIGTERMException` at the next step boundary
(a `SystemExit` with code None: rc 0 — `cwdpo/run/outcome.py` makes it 128 + the signal).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cwdpo.utils.signals import STATE, Interruption, signal_name

log = logging.getLogger(__name__)


class PreemptionCheckpoint(L.Callback):
    """On Lightning's step-boundary stop (`SIGTERMException`), save the stage's `last.ckpt`
    at the current step, atomically (the trainer's CheckpointIO), on every rank (the strategy
    decides who writes). Lightning's `OnExceptionCheckpoint` does the same into another file;
    this one is where `resume` looks, and the stage's ModelCheckpoint is told it wrote it."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        STATE["trainer"] = trainer

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        STATE["trainer"] = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        STATE["trainer"] = None  # from here on a signal raises `Interrupted`
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
        step = int(trainer.global_step)
        try:
            trainer.save_checkpoint(path)
        except Exception as e:  # e.g. a full disk: the stop is still said, with this reason
            STATE["saved"] = Interruption(signal_name(), self.stage, step, None, str(e))
            log.error("stage %s: saving the checkpoint at step %d failed: %s", self.stage, step, e)
            return
        STATE["saved"] = Interruption(signal_name(), self.stage, step, path)
        log.warning("stage %s: checkpoint at step %d saved to %s", self.stage, step, path)


__all__ = ["PreemptionCheckpoint"]
