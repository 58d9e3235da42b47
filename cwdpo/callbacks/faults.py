"""Numerical-fault handling (non-finite loss / gradients) and test-only fault injection.

`NonFiniteGuard` checks the loss before backward and every gradient before the optimizer
step (`faults.policy`):

- ``skip``: drop the update — all gradients are set to None, so the optimizer leaves the
  weights *and* its moments untouched — count it (`faults/skipped_steps`, in the stage's
  results as `nonfinite_skipped_steps`) and go on. Like AMP's GradScaler, a skipped step still
  uses up one of the stage's `steps` and advances the LR schedule. More than
  `max_consecutive_skips` in a row escalates to ``stop``.
- ``stop``: save `<run>/checkpoints/<stage>/nonfinite-step=<N>.ckpt` (weights before the bad
  update) and raise `NonFiniteError` naming the stage, step, what was non-finite and where.
- ``off``: no checks.

With `16-mixed` precision the gradient check is left to the GradScaler (inf/NaN gradients
are part of its loss-scale search); the loss check still applies.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import CompactHydraException

log = logging.getLogger(__name__)

POLICIES = ("skip", "stop", "off")
KILL_ENV = "CWDPO_FAULT_KILL_AT"
SIGNAL_ENV = "CWDPO_FAULT_SIGNAL"


class NonFiniteError(CompactHydraException, RuntimeError):
    """Training stopped on a non-finite loss or gradient (faults.policy=stop, or too many
    skips in a row). Compact: the CLI prints its message, not a Lightning traceback."""


class NonFiniteGuard(L.Callback):
    def __init__(
        self,
        policy: str = "skip",
        check_grads: bool = True,
        max_consecutive_skips: int = 10,
        stage: str = "",
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"faults.policy must be one of {list(POLICIES)}, got {policy!r}")
        if max_consecutive_skips < 0:
            raise ValueError(
                f"faults.max_consecutive_skips must be >= 0, got {max_consecutive_skips}"
            )
        self.policy, self.check_grads = policy, check_grads
        self.max_consecutive_skips = max_consecutive_skips
        self.stage = stage
        self.skipped = 0
        self.consecutive = 0
        self._bad_loss: float | None = None

    # -------------------------------------------------------------- checks
    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        # Not reset here: with gradient accumulation one bad micro-batch spoils the whole step.
        if self.policy == "off" or bool(torch.isfinite(loss.detach()).all()):
            return
        if self._bad_loss is None:
            self._bad_loss = float(loss.detach().float().reshape(-1)[0])
        if self.policy == "stop":
            self._stop(trainer, f"non-finite loss ({self._bad_loss})")

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if self.policy == "off":
            return
        what = []
        if self._bad_loss is not None:
            what.append(f"non-finite loss ({self._bad_loss})")
        if self.check_grads and not _grad_scaler_active(trainer):
            bad = _nonfinite_grads(pl_module)
            if bad:
                shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
                what.append(f"non-finite gradients in {len(bad)} parameter(s): {shown}")
        self._bad_loss = None
        if not what:
            self.consecutive = 0
            return
        reason = "; ".join(what)
        if self.policy == "stop":
            self._stop(trainer, reason)
        self.consecutive += 1
        if self.consecutive > self.max_consecutive_skips:
            self._stop(
                trainer,
                f"{reason} — {self.consecutive} non-finite steps in a row "
                f"(faults.policy=skip, faults.max_consecutive_skips="
                f"{self.max_consecutive_skips})",
                escalated=True,
            )
        for group in optimizer.param_groups:  # no update: AdamW skips parameters without grad
            for p in group["params"]:
                p.grad = None
        self.skipped += 1
        log.warning(
            "%s step %d: %s — update skipped (%d so far; faults.policy=skip)",
            self._where(trainer),
            trainer.global_step + 1,
            reason,
            self.skipped,
        )

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.policy != "off":
            pl_module.log(
                "faults/skipped_steps",
                float(self.skipped),
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )

    # -------------------------------------------------------------- stop
    def _where(self, trainer: L.Trainer) -> str:
        return f"stage {self.stage}" if self.stage else "training"

    def _stop(self, trainer: L.Trainer, reason: str, escalated: bool = False) -> None:
        """Save the last good state and raise an error that only says true things: the
        checkpoint that exists, what `resume=<run dir>` would continue from, the exact command,
        and advice that changes something (no "set faults.policy=skip" when it already is)."""
        step = trainer.global_step + 1  # the step being computed
        ckpt_dir = Path(
            getattr(trainer.checkpoint_callback, "dirpath", None)
            or Path(trainer.default_root_dir) / "checkpoints" / (self.stage or "stage")
        )
        path = ckpt_dir / f"nonfinite-step={step}.ckpt"
        saved = f"the state before this update is saved in {path}"
        try:
            trainer.save_checkpoint(path)
        except Exception as e:  # never hide the numerical error behind a saving error
            saved = f"saving a checkpoint to {path} failed too ({type(e).__name__}: {e})"
        why = "" if escalated else f" (faults.policy={self.policy})"
        raise NonFiniteError(
            f"{self._where(trainer)}, step {step}: {reason}. Training stopped{why}; {saved}. "
            f"{_resume_hint(trainer, ckpt_dir, self.stage)} {self._advice(trainer, escalated)}"
        )

    def _advice(self, trainer: L.Trainer, escalated: bool) -> str:
        lrs = sorted(
            {g.get("initial_lr", g["lr"]) for o in trainer.optimizers for g in o.param_groups}
        )
        key = f"stage.{self.stage}.optimizer.lr" if self.stage else "the learning rate"
        tips = [
            f"a lower {key} (now {', '.join(f'{lr:g}' for lr in lrs)})" if lrs else f"a lower {key}"
        ]
        if self.policy != "skip":
            tips.append("faults.policy=skip to skip such steps")
        elif escalated:
            tips.append(f"a higher faults.max_consecutive_skips (now {self.max_consecutive_skips})")
        return "Consider " + ", or ".join(tips) + "."

    # -------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))


def _resume_hint(trainer: L.Trainer, ckpt_dir: Path, stage: str) -> str:
    """What `resume=<run dir>` continues from now, and the exact command."""
    run_dir = Path(trainer.default_root_dir)
    last = (
        sorted(ckpt_dir.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
        if ckpt_dir.is_dir()
        else []
    )
    cb = trainer.checkpoint_callback
    what = f"stage {stage}" if stage else "this stage"
    if last:
        at = getattr(cb, "_last_global_step_saved", 0) if getattr(cb, "last_model_path", "") else 0
        from_ = f"{last[-1]}" + (f" (after step {at})" if at else "")
        continues = f"continues {what} from its last periodic checkpoint {from_}"
    else:
        every = getattr(cb, "_every_n_train_steps", None)
        first = f" (the first is written at step {every})" if every else ""
        continues = f"restarts {what} from its start: no periodic checkpoint exists yet{first}"
    return f"Resume with `{resume_command(run_dir)}`: it {continues}."


def resume_command(run_dir: Path) -> str:
    """`python -m cwdpo.train <this run's overrides> resume=<run dir>`."""
    import shlex

    args: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        args = [
            a
            for a in HydraConfig.get().overrides.task
            if a.split("=", 1)[0].lstrip("+~") not in ("resume", "hydra.run.dir")
        ]
    except Exception:  # not under Hydra (tests, notebooks): the run dir is enough to name
        pass
    return " ".join(
        ["python -m cwdpo.train", *map(shlex.quote, args), f"resume={shlex.quote(str(run_dir))}"]
    )


def _grad_scaler_active(trainer: L.Trainer) -> bool:
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def _nonfinite_grads(module: torch.nn.Module) -> list[str]:
    params = [(n, p) for n, p in module.named_parameters() if p.grad is not None]
    if not params:
        return []
    ok = torch.stack([torch.isfinite(p.grad).all() for _, p in params])
    if bool(ok.all()):
        return []
    return [n for (n, _), good in zip(params, ok.tolist()) if not good]


class KillAt(L.Callback):
    """Test-only fault injection: send this process `signal_name` (default SIGKILL; from the
    env vars CWDPO_FAULT_KILL_AT and CWDPO_FAULT_SIGNAL) at `<stage>:<step>`, i.e. when stage
    `stage` is about to compute step `step + 1` — right after the checkpoint for `step` was
    written — or `<stage>:start`, before its first step."""

    def __init__(self, stage: str, spec: str, signal_name: str = "SIGKILL") -> None:
        target, _, at = spec.partition(":")
        self.active = target == stage
        self.at = at
        self.signum = signal.Signals[
            signal_name if signal_name.startswith("SIG") else f"SIG{signal_name}"
        ]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active and self.at == "start":
            self._send()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.active and self.at != "start" and trainer.global_step == int(self.at):
            self._send()

    def _send(self) -> None:
        self.active = False  # once
        if self.signum == signal.SIGKILL:
            logging.shutdown()
        os.kill(os.getpid(), self.signum)


def reliability_callbacks(stage: str, cfg: Any) -> list[L.Callback]:
    """The callbacks every stage gets: non-finite guard, global RNG state for resume, the
    checkpoint on a stop signal, and (tests only) the kill switch."""
    from cwdpo.callbacks.preemption import PreemptionCheckpoint
    from cwdpo.callbacks.rng_state import GlobalRNGState

    f = cfg.get("faults") or {}
    cbs: list[L.Callback] = [
        NonFiniteGuard(
            policy=f.get("policy", "skip"),
            check_grads=bool(f.get("check_grads", True)),
            max_consecutive_skips=int(f.get("max_consecutive_skips", 10)),
            stage=stage,
        ),
        GlobalRNGState(),
        PreemptionCheckpoint(stage),
    ]
    if os.environ.get(KILL_ENV):
        cbs.append(KillAt(stage, os.environ[KILL_ENV], os.environ.get(SIGNAL_ENV) or "SIGKILL"))
    return cbs


__all__ = ["POLICIES", "KillAt", "NonFiniteError", "NonFiniteGuard", "reliability_callbacks"]
