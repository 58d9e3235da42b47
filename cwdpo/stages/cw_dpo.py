"""Stage 2: CW-DPO (vanilla DPO with cooling off; IPO / RPO variants by config)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from cwdpo.batch import PairBatch
from cwdpo.losses.config import PreferenceConfig
from cwdpo.losses.diagnostics import VULNERABLE_REGION, vulnerable_fraction
from cwdpo.losses.objectives import CWDPOOutput, PreferenceOutput, preference_loss
from cwdpo.model.ref_cache import cached_reference_logps, open_ref_cache, reference_signature
from cwdpo.stages.base import StageModule
from cwdpo.utils.reference_checkpoint import ReferenceCheckpoint, drops_reference

#: the loose knobs `CWDPOModule(..., beta=...)` accepts: the fields of `PreferenceConfig`
OBJECTIVE_FIELDS = tuple(f.name for f in dataclasses.fields(PreferenceConfig))


class CWDPOModule(StageModule):
    """−log σ(β(Δ_w − w_c·Δ_l)); reference log-probs from the backbone's reference policy.

    `objective` is the checked `PreferenceConfig` (`stage.cw_dpo.objective`); loose knobs
    (`beta=..., cooling=...`) build one, so a direct caller gets the same checks.
    `training_step` returns the step's terms for callbacks (`step_output`; Lightning passes
    it to `on_train_batch_end` as `outputs`).
    """

    stage_name = "cw_dpo"
    #: π_ref ← π_θ before this stage starts, unless the backbone already holds one
    needs_reference = True

    def __init__(
        self,
        *args: Any,
        objective: PreferenceConfig | None = None,
        prefix_sharing: bool = False,
        ref_cache: Any = None,
        disable_dropout: bool = True,
        vulnerable_region: Sequence[float] = VULNERABLE_REGION,
        **kwargs: Any,
    ) -> None:
        knobs = {k: kwargs.pop(k) for k in OBJECTIVE_FIELDS if k in kwargs}
        super().__init__(*args, **kwargs)
        if objective is not None and knobs:
            raise ValueError(
                f"give CWDPOModule an objective or its knobs {sorted(knobs)}, not both"
            )
        self.objective = objective if objective is not None else PreferenceConfig(**knobs)
        self.disable_dropout = disable_dropout
        # Speed (docs/scaling.md): run image + prompt once per pair (cwdpo.model.prefix), and reuse
        # reference log-probs of dataset pairs across epochs (cwdpo.model.ref_cache: a directory or
        # a RefLogpCache). Both are exact up to float rounding; both default off.
        self.prefix_sharing = prefix_sharing
        self.ref_cache = open_ref_cache(ref_cache)
        # π_ref in checkpoints: its signature, not its frozen copy (utils/reference_checkpoint.py)
        self.reference_checkpoint = ReferenceCheckpoint()
        #: a = σ(β·logits) ∈ [lo, hi] counts as DPO's vulnerable region (`vulnerable_frac`)
        self.vulnerable_region = tuple(float(x) for x in vulnerable_region)

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

    def training_step(self, batch: PairBatch, batch_idx: int) -> dict[str, Any]:
        """The loss for Lightning, and what callbacks read: see `step_output`. The vulnerable
        fraction is handed out, not logged under train/: the dynamics callback logs it once,
        as `dynamics/vulnerable_frac`, beside the weights it comes from."""
        res, pol = self.forward_loss(batch)
        metrics = self.step_metrics(pol, batch.n, res, batch)
        vulnerable = metrics.pop("vulnerable_frac")
        self.log_metrics("train", {"loss": res.loss, **metrics}, batch.n)
        self.step_in_flight = self.step_output(res, pol, vulnerable)
        return self.step_in_flight

    def step_output(self, res: PreferenceOutput, pol: Any, vulnerable: torch.Tensor) -> dict:
        """`loss`; `terms` (the detached `CWDPOOutput`: w_c, logits, kept, ℓ_floor); `logps`
        (the policy's `SeqLogps`, 2n rows, with their graph); `beta`, so a callback computes
        a = σ(β·logits) as the loss did; `vulnerable_frac` (a in `vulnerable_region`)."""
        return {
            "loss": res.loss,
            "terms": res.terms,
            "logps": pol,
            "beta": self.objective.beta,
            "vulnerable_frac": vulnerable,
        }

    #: the dict `training_step` returned, until the batch ends. The one hand-off that is not
    #: `outputs`: the gradient split runs in `on_before_backward`, where Lightning passes a
    #: callback only the loss, and it needs the policy log-probs with their graph.
    step_in_flight: dict[str, Any] | None = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.step_in_flight = None  # callbacks had it as `outputs`; free the graph

    def forward_loss(self, batch: PairBatch) -> tuple[PreferenceOutput, Any]:
        pol, ref, n = self.pair_logps(batch)
        return preference_loss(pol, ref, n, self.objective), pol

    def compute(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        res, pol = self.forward_loss(batch)
        return res.loss, self.step_metrics(pol, batch.n, res, batch)

    def step_metrics(
        self, pol: Any, n: int, res: PreferenceOutput, batch: PairBatch
    ) -> dict[str, torch.Tensor]:
        """TRL-named reward / log-prob metrics, cooling-weight stats, ℓ_floor as used, RPO's
        NLL, the vulnerable fraction."""
        out: CWDPOOutput = res.terms
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
            "floor": out.floor,
            "vulnerable_frac": vulnerable_fraction(
                out.logits, self.objective.beta, self.vulnerable_region
            ),
        }
        if res.rpo_nll is not None:
            metrics["rpo_nll"] = res.rpo_nll.detach()
        if out.kept is not None:
            metrics["filtered_frac"] = 1.0 - out.kept.float().mean()
        if batch.neg_is_dataset is not None:
            metrics["negatives/dataset_frac"] = batch.neg_is_dataset.float().mean()
            metrics["negatives/easy_frac"] = batch.neg_is_easy.float().mean()
        return metrics
