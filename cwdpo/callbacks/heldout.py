"""`HeldoutCurve`: the policy's greedy captions of a fixed held-out set, scored by the data's judge
every `every_n_steps` steps — the validation curve that convergence is read from.

The val *pair* metrics (`val/rewards/*`) are not comparable across methods: CW-DPO's rejected
reward carries w_c, and the val pairs differ between self-judged and dataset negatives. This
curve is the same quantity for every objective: the captions the policy would emit, judged
against the truth. "Steps to a common held-out target" (`cwdpo.analysis.runs.heldout_convergence`)
reads it from `<run>/heldout.csv`: one row per evaluation with the judge score and, on ShapesWorld
(records with a scene), the verifier's F1, exact rate and companion hallucination.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import lightning as L

from cwdpo.callbacks.schedule import EveryNSteps
from cwdpo.metrics.generation import generate_captions
from cwdpo.utils.run_files import StageAware, append_csv, stage_offset
from cwdpo.utils.safe_log import FAILURES, log_scalars

log = logging.getLogger(__name__)

HELDOUT_CSV = "heldout.csv"
SCENE_KEYS = ("f1", "verified_exact", "companion_halluc", "malformed")


def check_count(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"callbacks.heldout.{name} must be an integer >= {low}, got {value!r}")
    return value


def score_outputs(source: Any, records: Sequence[Any], outputs: Sequence[str]) -> dict[str, float]:
    """Mean judge score (%, `fact_accuracy`'s scale) and, with scenes, the verifier's metrics."""
    from cwdpo.metrics.hallucination import caption_metrics

    scores = [source.score(o, r) for o, r in zip(outputs, records)]
    row: dict[str, float] = {}
    if scores and all(s is not None for s in scores):
        row["score"] = 100.0 * sum(scores) / len(scores)
    if records and all("scene" in r.meta for r in records):
        m = caption_metrics(
            outputs, [r.meta["scene"] for r in records], getattr(source, "cooc", None)
        )
        row.update({k: m[k] for k in SCENE_KEYS if k in m and not math.isnan(m[k])})
    return row


class HeldoutCurve(StageAware, EveryNSteps):
    """Greedy-caption the first `n_items` records of `split` at the start of each stage in
    `stages`, every `every_n_steps` optimizer steps and at its end; score, append to
    `<run>/heldout.csv` and log `heldout/<metric>`. `every_n_steps=0` turns it off.

    A failed evaluation is a counted warning (cwdpo.utils.safe_log); training goes on."""

    def __init__(
        self,
        every_n_steps: int = 20,
        n_items: int = 64,
        split: str = "val",
        batch_size: int = 32,
        max_new_tokens: int = 32,
        stages: Sequence[str] = ("cw_dpo",),
    ) -> None:
        self.every_n_steps = check_count("every_n_steps", every_n_steps, 0)
        self.n_items = check_count("n_items", n_items, 1)
        self.batch_size = check_count("batch_size", batch_size, 1)
        self.max_new_tokens = check_count("max_new_tokens", max_new_tokens, 1)
        self.split, self.stages = str(split), [str(s) for s in stages]
        self.records: list[Any] = []
        self.outputs: list[str] = []  # the last evaluation's captions
        self.last_step: int | None = None
        self.offset = 0

    def active(self) -> bool:
        return self.every_n_steps > 0 and self.stage in self.stages

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.resolve_stage(trainer, pl_module)
        self.records, self.last_step = [], None
        if not self.active():
            return
        resumed = trainer.global_step > 0  # its rows so far are in the file; the schedule goes on
        if self.first and not resumed:  # a fresh run: this dir's stale curve goes
            (self.out_dir / HELDOUT_CSV).unlink(missing_ok=True)
        self.offset = stage_offset(self.out_dir, self.stage, bool(self.first))
        source = getattr(trainer.datamodule, "source", None)
        with FAILURES.guard("heldout curve"):
            self.records = list(source.captions(self.split))[: self.n_items]
        if self.records and not resumed:
            self.evaluate(trainer, pl_module)

    def has_work(self) -> bool:
        return bool(self.records)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step, t = trainer.global_step, time.perf_counter()
        self.last_step = step
        with FAILURES.guard("heldout curve"):
            source = trainer.datamodule.source
            self.outputs = self.generate(pl_module.backbone, source.prompt)
            row = score_outputs(source, self.records, self.outputs)
            meta = {"stage": self.stage, "step": step, "run_step": self.offset + step}
            meta |= {"split": self.split, "n": len(self.records)}
            append_csv(self.out_dir / HELDOUT_CSV, [{**meta, **row}])
            log_scalars(trainer, {f"heldout/{k}": v for k, v in row.items()}, step)
            log.debug(
                "heldout %s step %d: %s (%.1fs)", self.stage, step, row, time.perf_counter() - t
            )

    def generate(self, backbone: Any, prompt: str) -> list[str]:
        return generate_captions(
            backbone, self.records, prompt, self.batch_size, self.max_new_tokens
        )
