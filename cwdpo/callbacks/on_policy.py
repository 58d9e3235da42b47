"""Refresh on-policy negatives from the current policy on a step schedule."""

from __future__ import annotations

from typing import Any

import lightning as L


class OnPolicyNegatives(L.Callback):
    """Every `every_n_steps` optimizer steps (and before the first), resample the datamodule's
    on-policy buffer with the policy being trained."""

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"negatives.refresh_every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.last_refresh: int | None = None
        self.pending: dict[str, float] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.last_refresh is None:  # a resumed run keeps its restored buffer
            self._refresh(trainer, pl_module)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        for k, v in self.pending.items():
            pl_module.log(k, v, on_step=True, on_epoch=False, batch_size=1)
        self.pending = {}
        step = trainer.global_step
        if (
            step % self.every_n_steps == 0
            and step != self.last_refresh
            and step < trainer.max_steps
        ):
            self._refresh(trainer, pl_module)

    def _refresh(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        stats = dm.refresh_on_policy(pl_module.backbone.generate, trainer.global_step)
        self.last_refresh = trainer.global_step
        self.pending = stats  # logged at the next batch end (logging is not allowed in every hook)

    def state_dict(self) -> dict[str, Any]:
        return {"last_refresh": self.last_refresh}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_refresh = state_dict.get("last_refresh")
