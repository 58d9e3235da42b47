"""Stage 1: constrained SFT (plain SFT when λ = 0 or no negatives are given)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from cwdpo.batch import Batch, PairBatch
from cwdpo.losses.config import SFTCConfig
from cwdpo.losses.objectives import sft_c_objective
from cwdpo.losses.sequence import logps_with_vocab_mean, nll_of
from cwdpo.stages.base import StageModule

#: the loose knobs `SFTCModule(..., lam=...)` accepts: the fields of `SFTCConfig`
SFTC_FIELDS = tuple(f.name for f in dataclasses.fields(SFTCConfig))


class SFTCModule(StageModule):
    """L = E[NLL_ε(y⁺)] + λ·ReLU(C − E[NLL(y⁻)]) — see `cwdpo.losses.objectives.sft_c_objective`.

    `objective` is the checked `SFTCConfig` (`stage.<name>.objective`); loose knobs
    (`lam=...`) build one, so a direct caller gets the same checks.
    """

    stage_name = "sft_c"

    def __init__(self, *args: Any, objective: SFTCConfig | None = None, **kwargs: Any) -> None:
        knobs = {k: kwargs.pop(k) for k in SFTC_FIELDS if k in kwargs}
        super().__init__(*args, **kwargs)
        if objective is not None and knobs:
            raise ValueError(f"give SFTCModule an objective or its knobs {sorted(knobs)}, not both")
        self.objective = objective if objective is not None else SFTCConfig(**knobs)

    def compute(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        paired = isinstance(batch, PairBatch)  # gentle negatives: rows n.. are the rejected
        cfg, n = self.objective, batch.n
        logits, labels = self.backbone.aligned_logits(batch.inputs)
        lp, vocab_mean = logps_with_vocab_mean(logits, labels)  # the one log-softmax
        pos = slice(0, n)
        pos_nll = nll_of(lp.rows(pos), vocab_mean[pos], cfg.label_smoothing, cfg.reduction)
        neg_nll = None
        if paired:
            neg = slice(n, None)
            neg_nll = nll_of(lp.rows(neg), vocab_mean[neg], 0.0, cfg.reduction)
        out = sft_c_objective(pos_nll, neg_nll, cfg)
        metrics = {
            "nll_pos": out.pos_nll,
            "penalty": out.penalty,
            "ell_pos": lp.mean[pos].mean().detach(),
        }
        if paired:
            metrics.update(
                nll_neg=out.neg_nll, violated=out.violated, ell_neg=lp.mean[n:].mean().detach()
            )
        return out.loss, metrics
