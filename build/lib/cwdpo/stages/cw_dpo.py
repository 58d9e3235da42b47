"""Stage 2: CW-DPO (vanilla DPO with cooling off; IPO / RPO variants by config)."""

from __future__ import annotations

from typing import Any, Literal

import torch

from cwdpo.batch import PairBatch
from cwdpo.losses.diagnostics import VULNERABLE_REGION, vulnerable_fraction
from cwdpo.losses.objectives import CWDPOOutput, LossType, PreferenceConfig, preference_loss
from cwdpo.model.ref_cache import cached_reference_logps, open_ref_cache, reference_signature
from cwdpo.stages.base import StageModule
from cwdpo.utils.reference_checkpoint import ReferenceCheckpoint, drops_reference


class CWDPOModule(StageModule):
    """−log σ(β(Δ_w − w_c·Δ_l)); reference log-probs from the backbone's reference policy."""

    stage_name = "cw_dpo"
    #: a ∈ [lo, hi] of `train/vulnerable_frac`; the dynamics callback sets its configured
    #: `callbacks.dynamics.vulnerable_region` here, so both metrics count the same region
    vulnerable_region: tuple[float, float] = VULNERABLE_REGION

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        cooling: bool = True,
        floor: float | str = -2.0,
        tau: float = 0.5,
        filter_threshold: float | None = None,
        loss_type: Literal["sigmoid", "ipo", "sft"] = "sigmoid",
        rpo_alpha: float = 0.0,
        loser_weight: float | None = None,
        shuffle_weights: bool = False,
        prefix_sharing: bool = False,
        ref_cache: Any = None,
        disable_dropout: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.disable_dropout = disable_dropout
        # Speed (docs/scaling.md): run image + prompt once per pair (cwdpo.model.prefix), and reuse
        # reference log-probs of dataset pairs across epochs (cwdpo.model.ref_cache: a directory or
        # a RefLogpCache). Both are exact up to float rounding; both default off.
        self.prefix_sharing = prefix_sharing
        self.ref_cache = open_ref_cache(ref_cache)
        # π_ref in checkpoints: its signature, not its frozen copy (utils/reference_checkpoint.py)
        self.reference_checkpoint = ReferenceCheckpoint()
        self.beta, self.cooling, self.floor, self.tau = beta, cooling, floor, tau
        self.filter_threshold, self.loss_type, self.rpo_alpha = (
            filter_threshold,
            loss_type,
            rpo_alpha,
        )
        # baselines (issue 17): w_c ≡ loser_weight, w_c shuffled in the batch, or loss_type="sft":
        # NLL of the chosen only (RFT on self-judged pairs, SFT continuation on dataset pairs)
        if loss_type not in {t.value for t in LossType}:
            raise ValueError(f"stage.cw_dpo.loss_type must be sigmoid|ipo|sft, got {loss_type!r}")
        if loser_weight is not None and loser_weight < 0:
            raise ValueError(f"stage.cw_dpo.loser_weight must be >= 0 or null, got {loser_weight}")
        if shuffle_weights and (not cooling or loser_weight is not None):
            raise ValueError(
                "stage.cw_dpo.shuffle_weights needs cooling=true and loser_weight=null "
                f"(got cooling={cooling}, loser_weight={loser_weight})"
            )
        self.loser_weight, self.shuffle_weights = loser_weight, shuffle_weights
        self.last_output = None  # for diagnostics callbacks
        # policy SeqLogps with graph: the gradient split (callbacks/dynamics)
        self.last_logps = None

    def on_fit_start(self) -> None:
        if not self.backbone.has_reference:
            raise RuntimeError(
                "CW-DPO stage started without a reference policy: run stage 1 first, or start "
                "stage=cw_dpo from a checkpoint (the pipeline snapshots π_ref ← π_θ)"
            )
        if self.disable_dropout:
            self.backbone.disable_dropout()
        if self.ref_cache is not None:
            self.ref_cache.bind_reference(self.backbone, rank=self.global_rank)

    # π_ref is not training state: checkpoints carry its signature, not (under single-device /
    # DDP) its frozen copy, and loading refuses another reference (cwdpo.utils.reference_checkpoint)
    def setup(self, stage: str) -> None:
        # before the strategy moves, casts or shards anything, and before a checkpoint is restored
        self.reference_checkpoint.signature = (
            reference_signature(self.backbone) if self.backbone.has_reference else None
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.reference_checkpoint.save(checkpoint, drop=drops_reference(self._trainer))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.reference_checkpoint.load(checkpoint, self.backbone.reference)

    def on_train_epoch_end(self) -> None:
        if self.ref_cache is not None:
            self.ref_cache.flush()

    def on_fit_end(self) -> None:
        if self.ref_cache is not None:
            self.ref_cache.flush()

    def pair_logps(self, batch: PairBatch):
        enc, n = batch.inputs, batch.n
        shared = self.prefix_sharing
        pol = self.backbone.pair_logps(enc, n, prefix_sharing=shared)
        if self.ref_cache is not None and self.ref_cache.fingerprint is not None:
            ref = cached_reference_logps(  # on-policy negatives: computed, never stored
                self.backbone, self.ref_cache, enc, n, batch.neg_is_dataset, shared
            )
        else:
            ref = self.backbone.pair_logps(enc, n, reference=True, prefix_sharing=shared).sum
        return pol, ref, n

    @property
    def objective(self) -> PreferenceConfig:
        """The loss knobs as `objectives.preference_loss` reads them."""
        return PreferenceConfig(
            loss_type=self.loss_type,
            beta=self.beta,
            cooling=self.cooling,
            floor=self.floor,
            tau=self.tau,
            filter_threshold=self.filter_threshold,
            rpo_alpha=self.rpo_alpha,
            loser_weight=self.loser_weight,
            shuffle_weights=self.shuffle_weights,
        )

    def compute(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pol, ref, n = self.pair_logps(batch)
        res = preference_loss(pol, ref, n, self.objective)
        self.last_output, self.last_logps = res.terms, pol
        return res.loss, self.step_metrics(pol, n, res.terms, batch)

    def step_metrics(
        self, pol: Any, n: int, out: CWDPOOutput, batch: PairBatch
    ) -> dict[str, torch.Tensor]:
        """TRL-named reward / log-prob metrics, cooling-weight stats, the vulnerable fraction."""
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
            "cooling/mean": w.mean(),
            "cooling/min": w.min(),
            "cooling/max": w.max(),
            "vulnerable_frac": vulnerable_fraction(out.logits, self.beta, self.vulnerable_region),
        }
        if out.kept is not None:
            metrics["filtered_frac"] = 1.0 - out.kept.float().mean()
        if batch.neg_is_dataset is not None:
            metrics["negatives/dataset_frac"] = batch.neg_is_dataset.float().mean()
            metrics["negatives/easy_frac"] = batch.neg_is_easy.float().mean()
        return metrics
