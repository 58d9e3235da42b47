"""Stop signals for a training process, without importing Lightning (a config error stays fast):
SIGTERM (SLURM preemption, `kill`), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's requeue signal).

`install_signal_handlers` sets one process-wide handler. Inside `Trainer.fit` (the callback in
`cwdpo/callbacks/preemption.py` registers the trainer) it records the signal and sets Lightning's
own stop flag (`trainer._signal_connector.received_sigterm`, what Lightning's SIGTERM handler
sets): the loops stop at the next step boundary and the callback saves a checkpoint there.
Lightning chains this handler behind its own SIGTERM handler during `fit` (it keeps existing
ones). A second Ctrl-C stops at once. Outside `fit` (evaluation, saving, loading) the handler
raises `Interrupted`, so the run still stops with a reason and a non-zero code.

Under SLURM (`SLURMEnvironment.detect()`, checked only when SLURM variables are set) SIGUSR1 is
left alone: Lightning installs its auto-requeue handler only on a signal nobody handles (it saves
`hpc_ckpt_<n>.ckpt` in the run dir and runs `scontrol requeue`); the SIGTERM that follows takes
the path above. The requeued job needs `resume=<run dir>` (`interrupted.json` gives the command).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

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
    error: str | None = None  # why saving the checkpoint failed (e.g. a full disk)


STATE: dict[str, Any] = {"signal": None, "trainer": None, "saved": None}


def _handler(signum: int, frame: FrameType | None) -> None:
    again = STATE["signal"] is not None
    STATE["signal"] = signum
    trainer = STATE["trainer"]
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


def _slurm_owns_sigusr1() -> bool:
    if not any(k.startswith("SLURM_") for k in os.environ):
        return False
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect()


def install_signal_handlers() -> Callable[[], None]:
    """Handle SIGTERM, SIGINT and (unless Lightning's SLURM auto-requeue owns it) SIGUSR1 for
    this process; returns a function that puts the previous handlers back."""
    signals = [signal.SIGTERM, signal.SIGINT]
    if not _slurm_owns_sigusr1():
        signals.append(signal.SIGUSR1)
    STATE.update(signal=None, trainer=None, saved=None)
    old = {s: signal.signal(s, _handler) for s in signals}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore


def signal_name() -> str:
    """The stop signal this process received (SIGTERM when the handler never saw one)."""
    signum = STATE["signal"]
    return signal.Signals(signum).name if signum is not None else "SIGTERM"


def interruption(exc: BaseException | None) -> Interruption | None:
    """What `exc` says about a signal stop (None: not one). Lightning's `SIGTERMException`
    without a signal seen here: SIGTERM delivered to Lightning alone."""
    if isinstance(exc, Interrupted):
        return Interruption(signal.Signals(exc.signum).name)
    if isinstance(exc, KeyboardInterrupt):
        return Interruption("SIGINT")
    if type(exc).__name__ == "SIGTERMException":  # Lightning's (a SystemExit), not imported
        return STATE["saved"] or Interruption(signal_name())
    return None
