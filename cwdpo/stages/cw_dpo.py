"""Stage 2: CW-DPO (vanilla DPO with cooling off; IPO / RPO variants by config)."""

from __future__ import annotations

from typing import Any, Literal

import torch

from cwdpo.objectives import cw_dpo_loss
from cwdpo.stages.base import StageModule


class CWDPOModule(StageModule):
    """−log σ(β(Δ_w − w_c·Δ_l)); reference log-probs from the backbone's reference policy."""

    stage_name = "cw_dpo"

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        cooling: bool = True,
        floor: float | str = -2.0,
        tau: float = 0.5,
        filter_threshold: float | None = None,
        loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
        rpo_alpha: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.beta, self.cooling, self.floor, self.tau = beta, cooling, floor, tau
        self.filter_threshold, self.loss_type, self.rpo_alpha = filter_threshold, loss_type, rpo_alpha
        self.last_output = None  # for diagnostics callbacks

    def on_fit_start(self) -> None:
        if not self.backbone.has_reference:
            raise RuntimeError(
                "CW-DPO stage started without a reference policy: run stage 1 first, or start "
                "stage=cw_dpo from a checkpoint (the pipeline snapshots π_ref ← π_θ)"
            )

    def pair_logps(self, batch: dict[str, Any]):
        enc, n = batch["pairs"], batch["n"]
        pol = self.backbone.logps(enc)
        if "ref_logps" in batch:  # precomputed / cached reference log-probs
            ref = batch["ref_logps"]
        else:
            ref = self.backbone.logps(enc, reference=True).sum
        return pol, ref, n

    def compute(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pol, ref, n = self.pair_logps(batch)
        out = cw_dpo_loss(
            pol.sum[:n], pol.sum[n:], ref[:n], ref[n:], pol.mean[n:],
            beta=self.beta, cooling=self.cooling, floor=self.floor, tau=self.tau,
            filter_threshold=self.filter_threshold, loss_type=self.loss_type,
        )
        loss = out.loss
        if self.rpo_alpha > 0:  # RPO: DPO + NLL (per token) on the chosen response
            loss = loss + self.rpo_alpha * (-pol.mean[:n]).mean()
        self.last_output = out
        w = out.weights
        metrics = {
            "rewards/chosen": out.chosen_rewards.mean(),
            "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean(),
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean(),
            "logps/chosen": pol.sum[:n].mean().detach(),
            "logps/rejected": pol.sum[n:].mean().detach(),
            "ell/chosen": pol.mean[:n].mean().detach(),
            "ell/rejected": pol.mean[n:].mean().detach(),
            "cooling/mean": w.mean(), "cooling/min": w.min(), "cooling/max": w.max(),
            "vulnerable_frac": _vulnerable(out.logits, self.beta),
        }
        if out.kept is not None:
            metrics["filtered_frac"] = 1.0 - out.kept.float().mean()
        if "neg_is_dataset" in batch:
            metrics["negatives/dataset_frac"] = batch["neg_is_dataset"].float().mean()
            metrics["negatives/easy_frac"] = batch["neg_is_easy"].float().mean()
        return loss, metrics


def _vulnerable(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Fraction of pairs with a = σ(β·logits) in DPO's vulnerable region [0.8, 0.99]."""
    a = torch.sigmoid(beta * logits)
    return ((a >= 0.8) & (a <= 0.99)).float().mean()
