"""Stage 1: constrained SFT (plain SFT when λ = 0 or no negatives are given)."""

from __future__ import annotations

from typing import Any, Literal

import torch

from cwdpo.batch import Batch, PairBatch
from cwdpo.losses.objectives import sft_c_loss, smoothed_nll
from cwdpo.stages.base import StageModule


class SFTCModule(StageModule):
    """L = E[NLL_ε(y⁺)] + λ·ReLU(C − E[NLL(y⁻)]) — see `cwdpo.losses.objectives.sft_c_loss`."""

    stage_name = "sft_c"

    def __init__(
        self,
        *args: Any,
        lam: float = 0.0,
        margin_c: float = 1.0,
        reduction: Literal["sum", "mean"] = "mean",
        label_smoothing: float = 0.0,
        constraint: Literal["soft", "hard"] = "soft",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lam, self.margin_c = lam, margin_c
        self.reduction, self.label_smoothing, self.constraint = (
            reduction,
            label_smoothing,
            constraint,
        )

    def compute(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        paired = isinstance(batch, PairBatch)  # gentle negatives: rows n.. are the rejected
        lp, logits, labels = self.backbone.logps_and_logits(batch.inputs)
        n = batch.n
        pos_slice = slice(0, n)
        pos_nll = smoothed_nll(
            logits[pos_slice], labels[pos_slice], self.label_smoothing, self.reduction
        )
        neg_nll = None
        if paired:
            neg_nll = smoothed_nll(logits[n:], labels[n:], 0.0, self.reduction)
        out = sft_c_loss(pos_nll, neg_nll, self.lam, self.margin_c, self.constraint)
        metrics = {
            "nll_pos": out.pos_nll,
            "penalty": out.penalty,
            "ell_pos": lp.mean[pos_slice].mean().detach(),
        }
        if paired:
            metrics.update(
                nll_neg=out.neg_nll, violated=out.violated, ell_neg=lp.mean[n:].mean().detach()
            )
        return out.loss, metrics
