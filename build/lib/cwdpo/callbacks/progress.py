"""Progress bar per stage: "sft_c · epoch 0 … step 37/120", not "Epoch 3/-2 … v_num: ft_c".

Why: every stage runs to `max_steps` with `max_epochs=-1`, so Lightning's default bar showed
"Epoch 0/-2" and a truncated logger version (`v_num`), and no step count against the budget.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE


class _StageBar:
    stage: str = ""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        items.pop("v_num", None)
        total = trainer.max_steps
        items["step"] = (
            f"{trainer.global_step}/{total}" if total and total > 0 else str(trainer.global_step)
        )
        return items

    def _describe(self, epoch: int) -> str:
        return f"{self.stage} · epoch {epoch}" if self.stage else f"epoch {epoch}"


class RichStageBar(_StageBar, RichProgressBar):
    def __init__(self, stage: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stage = stage

    def _get_train_description(self, current_epoch: int) -> str:
        d = self._describe(current_epoch)
        return (
            f"{d:{len(self.validation_description)}}"
            if len(self.validation_description) > len(d)
            else d
        )


class TQDMStageBar(_StageBar, TQDMProgressBar):
    def __init__(self, stage: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stage = stage

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(self._describe(trainer.current_epoch))


def stage_progress_bar(stage: str) -> ProgressBar:
    """The bar Lightning would pick (Rich when installed, else tqdm), labelled by stage."""
    return RichStageBar(stage) if _RICH_AVAILABLE else TQDMStageBar(stage)
