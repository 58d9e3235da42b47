"""Per-step CW-DPO dynamics: cooling weights, the vulnerable region, and the gradient split.

Reads what `CWDPOModule.training_step` returns (`outputs` of `on_train_batch_end`: the
detached loss terms, β, the vulnerable fraction; before backward, the policy's per-token
log-probs with their graph from the step in flight) and logs
- the cooling-weight distribution of every batch (stats each step, W&B histograms every
  `histogram_every_n_steps`, all weights in `<run>/cooling_weights.csv` for the plots);
- the fraction of pairs with a = σ(β(Δ_w − w_c Δ_l)) in DPO's vulnerable region (the module
  computes it, with its `vulnerable_region`; it is logged here only, not under train/);
- every `grad_split_every_n_steps` steps, ‖g_w‖, ‖g_l‖, ‖g‖ and cos(g_w, g_l): the gradient
  through the chosen responses vs through the rejected ones (`diagnostics.gradient_split`,
  two extra vector–Jacobian products on those steps only), plus the relative residual
  ‖g_w + g_l − g‖/‖g‖ against the gradient the optimizer actually receives.
Scalars go to every logger and to `<run>/dynamics.csv` (long format: stage, step, run_step,
metric, value). Stages without a DPO loss (SFT, SFT-C) are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from cwdpo.losses.diagnostics import GradSplit, gradient_split, group_stats
from cwdpo.utils.run_files import StageAware, append_csv, record_stage, stage_offset
from cwdpo.utils.safe_log import log_scalars, never_fatal, wandb_histogram

DYNAMICS_CSV = "dynamics.csv"
WEIGHTS_CSV = "cooling_weights.csv"


class DynamicsMonitor(StageAware, L.Callback):
    """Cooling-weight / vulnerable-region stats every step; gradient split at an interval."""

    def __init__(
        self,
        grad_split_every_n_steps: int = 25,
        record_every_n_steps: int = 1,
        histogram_every_n_steps: int = 5,
        check_residual: bool = True,
        quantiles: Sequence[float] = (0.1, 0.5, 0.9),
    ) -> None:
        self.grad_split_every_n_steps = int(grad_split_every_n_steps)  # 0 disables
        self.record_every_n_steps = max(1, int(record_every_n_steps))
        self.histogram_every_n_steps = int(histogram_every_n_steps)
        self.check_residual = check_residual
        self.quantiles = [float(q) for q in quantiles]
        self.offset = 0
        self._step = 0
        self._split: GradSplit | None = None
        self._params: list[torch.Tensor] = []
        self.splits: list[dict[str, float]] = []  # every gradient split of this stage
        self._resumed = False

    # ------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.resolve_stage(trainer, pl_module)
        if self.first and not self._resumed:
            self.clear_run_files(DYNAMICS_CSV, WEIGHTS_CSV)
        self.offset = stage_offset(self.out_dir, self.stage, bool(self.first))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = trainer.global_step

    def _split_due(self) -> bool:
        k = self.grad_split_every_n_steps
        return k > 0 and self._step % k == 0

    @never_fatal("dynamics/gradsplit")
    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        step = getattr(pl_module, "step_in_flight", None)
        pol = step.get("logps") if isinstance(step, dict) else None
        if not self._split_due() or pol is None or not pol.token.requires_grad:
            return
        self._params = [p for p in pl_module.backbone.model.parameters() if p.requires_grad]
        n = pol.token.shape[0] // 2  # collate_pairs: chosen rows, then rejected rows
        self._split = gradient_split(
            loss, [pol.token], self._params, n, retain_graph=True, return_grads=self.check_residual
        )

    @never_fatal("dynamics/gradsplit")
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        s = self._split
        if s is None or s.grads_w is None:
            return
        if trainer.accumulate_grad_batches == 1:  # .grad holds exactly this batch's gradient
            diff = ref = 0.0
            for p, a, b in zip(self._params, s.grads_w, s.grads_l):
                g = (
                    p.grad.double()
                    if p.grad is not None
                    else torch.zeros_like(p, dtype=torch.float64)
                )
                mine = torch.zeros_like(g)
                if a is not None:
                    mine += a.double()
                if b is not None:
                    mine += b.double()
                diff += float((mine - g).pow(2).sum())
                ref += float(g.pow(2).sum())
            s.residual = math.sqrt(diff) / max(math.sqrt(ref), 1e-30)
        s.grads_w = s.grads_l = None  # free the copies
        self._params = []

    @never_fatal("dynamics/stats")
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        out = outputs.get("terms") if isinstance(outputs, dict) else None
        if out is None or getattr(out, "weights", None) is None:
            return  # not a DPO-style step (SFT, SFT-C)
        step, beta = self._step, float(outputs["beta"])
        metrics = self.batch_metrics(out, beta, batch)
        metrics["dynamics/vulnerable_frac"] = float(outputs["vulnerable_frac"])
        split, self._split = self._split, None
        if split is not None:
            sd = {f"gradsplit/{k}": v for k, v in split.as_dict().items()}
            sd["gradsplit/ratio_l_w"] = (
                split.norm_l / split.norm_w if split.norm_w > 0 else math.nan
            )
            if split.residual is not None:
                sd["gradsplit/residual"] = split.residual
            metrics.update(sd)
            self.splits.append({"step": step, **sd})
        log_scalars(trainer, metrics, step)
        if step % self.record_every_n_steps == 0 or split is not None:
            base = {"stage": self.stage, "step": step, "run_step": self.offset + step}
            append_csv(
                self.out_dir / DYNAMICS_CSV,
                [{**base, "metric": k, "value": v} for k, v in metrics.items()],
            )
            w, a = out.weights.float().cpu(), self._a(out, beta).cpu()
            easy = getattr(batch, "neg_is_easy", None)  # a PairBatch's negatives, if known
            sources = getattr(batch, "sources", None) or None
            append_csv(
                self.out_dir / WEIGHTS_CSV,
                [
                    {
                        **base,
                        "w": float(w[i]),
                        "a": float(a[i]),
                        "easy": int(easy[i]) if easy is not None else "",
                        "source": sources[i] if sources is not None else "",
                    }
                    for i in range(len(w))
                ],
            )
        k = self.histogram_every_n_steps
        if k > 0 and step % k == 0:
            self.log_histograms(trainer, out, beta, step)

    def state_dict(self) -> dict[str, Any]:
        return {"offset": self.offset}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed = True  # keep the CSVs written before the checkpoint

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.out_dir is not None:
            record_stage(self.out_dir, self.stage, self.offset, trainer.global_step)

    # ------------------------------------------------------------ pieces
    @staticmethod
    def _a(out: Any, beta: float) -> torch.Tensor:
        return torch.sigmoid(beta * out.logits.float())

    def batch_metrics(self, out: Any, beta: float, batch: Any) -> dict[str, float]:
        """Cooling-weight distribution (its min / max are the stage's train/cooling/*) and the
        mean a of one batch."""
        w = out.weights.detach().float().cpu()
        a = torch.sigmoid(beta * out.logits.detach().float().cpu())
        m = {f"dynamics/cooling/{k}": v for k, v in group_stats(w, self.quantiles).items()}
        m["dynamics/cooling/std"] = float(w.std(unbiased=False))
        m["dynamics/a_mean"] = float(a.mean())
        easy = getattr(batch, "neg_is_easy", None)
        if easy is not None and len(easy) == len(w):
            easy = easy.bool().cpu()
            if easy.any():
                m["dynamics/cooling/easy_mean"] = float(w[easy].mean())
            if (~easy).any():
                m["dynamics/cooling/hard_mean"] = float(w[~easy].mean())
        return m

    @never_fatal("dynamics histograms")
    def log_histograms(self, trainer: L.Trainer, out: Any, beta: float, step: int) -> None:
        """W&B histograms on the project's own bins: at the first CW-DPO step every
        a = σ(β·margin) is ≈ 0.5, a range numpy's 20 float32 bins cannot split."""
        from cwdpo.callbacks.wandb_logger import has_wandb, log_media

        if not has_wandb(trainer):
            return
        log_media(
            trainer,
            {
                "dynamics/cooling_weights": wandb_histogram(out.weights.float().cpu().numpy()),
                "dynamics/dpo_a": wandb_histogram(self._a(out, beta).cpu().numpy()),
            },
            step,
        )
