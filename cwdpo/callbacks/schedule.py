"""The evaluation schedule the held-out curve and the benchmark curves share.

Evaluate at the stage's start (the subclass's `on_train_start` calls `evaluate` when it has
something to evaluate), every `every_n_steps` optimizer steps and once more at the stage's end,
never twice at one step (`last_step`, set by `evaluate`): so two curves of one run have points
at the same steps, and a stage whose last step is on the schedule is not evaluated twice.
"""

from __future__ import annotations

from typing import Any

import lightning as L


class EveryNSteps(L.Callback):
    """Calls `evaluate(trainer, pl_module)` on the schedule above while `has_work()`."""

    every_n_steps: int
    last_step: int | None = None

    def has_work(self) -> bool:
        """Whether this stage has anything to evaluate (items read, the callback on)."""
        raise NotImplementedError

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Evaluate now; sets `last_step` to the step it evaluated at."""
        raise NotImplementedError

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if self.has_work() and step % self.every_n_steps == 0 and step != self.last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.has_work() and trainer.global_step != self.last_step:
            self.evaluate(trainer, pl_module)
