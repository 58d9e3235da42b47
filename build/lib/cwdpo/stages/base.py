"""The small base shared by both stages: backbone, optimizer/scheduler partials, logging."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from cwdpo.batch import Batch
from cwdpo.model.backbone import VLMBackbone
from cwdpo.utils.strategies import data_parallel_mesh, shard_backbone


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    min_ratio: float = 0.1,
) -> LambdaLR:
    """Linear warm-up then cosine decay to `min_ratio` of the peak learning rate."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return LambdaLR(optimizer, f)


class StageModule(L.LightningModule):
    """Thin by design: subclasses turn a batch into a loss via `cwdpo.losses.objectives`."""

    stage_name = "stage"

    def __init__(
        self,
        backbone: VLMBackbone,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        total_steps: int = 100,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.total_steps = total_steps

    def configure_model(self) -> None:
        """Under `ModelParallelStrategy` (trainer=fsdp2 / fsdp_cpu), shard the backbone with
        FSDP2 over the data-parallel mesh; every other strategy leaves the model as it is."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None and not getattr(self, "_sharded", False):
            shard_backbone(self.backbone, data_parallel_mesh(mesh))
            self._sharded = True

    def configure_optimizers(self) -> Any:
        params = [p for p in self.backbone.model.parameters() if p.requires_grad]
        opt = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(opt, total_steps=self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def log_metrics(self, prefix: str, metrics: dict[str, torch.Tensor | float], n: int) -> None:
        on_step = prefix == "train"
        for k, v in metrics.items():
            v = torch.as_tensor(v, dtype=torch.float32).detach()
            self.log(
                f"{prefix}/{k}",
                v,
                on_step=on_step,
                on_epoch=not on_step,
                prog_bar=k == "loss",
                batch_size=n,
                sync_dist=not on_step,
            )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Total gradient norm every step: the stability statistics in `cwdpo.report` use it."""
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])
            )
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False, batch_size=1)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, metrics = self.compute(batch)
        self.log_metrics("train", {"loss": loss, **metrics}, batch.n)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        loss, metrics = self.compute(batch)
        self.log_metrics("val", {"loss": loss, **metrics}, batch.n)

    def compute(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError
