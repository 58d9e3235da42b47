"""`BenchmarkCurve`: real benchmarks (POPE, CHAIR, AMBER, MMHal-Bench, MMMU, MMBench — any
name in `cwdpo.metrics.benchmarks.registry`) on a fixed subset, during training, scored by the
same official rules as `cwdpo.eval`, so the POPE / CHAIR curves sit next to the held-out curve
and the Δlogp probes on the dashboards.

At the start of each stage in `stages`, every `every_n_steps` optimizer steps and at its end,
each task's first `n_items` questions (per POPE split and AMBER task; an MMBench question with
all its rotations) are answered greedily — each DDP rank its shard, answers gathered, scored
on rank 0 (a judge is asked once per answer) and the numbers broadcast — and logged as
`bench/<task>/<metric>` and appended to `<run>/benchmarks.csv` (long format: stage, step, run_step, task, n, metric, value). The last values also go into the
stage's results.json entry (`bench/...`). A failing task is a counted warning; training goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L

from cwdpo.callbacks.heldout import check_count
from cwdpo.callbacks.schedule import EveryNSteps
from cwdpo.metrics.benchmarks.generate import generate_answers, score_answers
from cwdpo.metrics.benchmarks.registry import BENCHMARKS, build_task, subset
from cwdpo.utils.run_files import StageAware, append_csv, stage_offset
from cwdpo.utils.safe_log import FAILURES, log_scalars

log = logging.getLogger(__name__)

BENCH_CSV = "benchmarks.csv"


class BenchmarkCurve(StageAware, EveryNSteps):
    """Benchmarks `tasks` (their nodes in `configs`, e.g. `{pope: {path: ...}}`) every
    `every_n_steps` steps on `n_items` questions each; `every_n_steps=0` or no tasks: off."""

    def __init__(
        self,
        tasks: Sequence[str] = (),
        configs: Mapping[str, Mapping[str, Any]] | None = None,
        every_n_steps: int = 50,
        n_items: int = 16,
        batch_size: int = 16,
        stages: Sequence[str] = ("cw_dpo",),
    ) -> None:
        unknown = [t for t in tasks if t not in BENCHMARKS]
        if unknown:
            raise ValueError(
                f"callbacks.benchmarks.tasks: unknown benchmark(s) {unknown}; "
                f"choose from {sorted(BENCHMARKS)}"
            )
        self.tasks, self.configs = [str(t) for t in tasks], dict(configs or {})
        self.every_n_steps = check_count("every_n_steps", every_n_steps, 0)
        self.n_items = check_count("n_items", n_items, 1)
        self.batch_size = check_count("batch_size", batch_size, 1)
        self.stages = [str(s) for s in stages]
        self.items: dict[str, tuple[Any, list[Any]]] = {}  # task → (benchmark, items)
        self.last: dict[str, float] = {}  # the last evaluation's `bench/...` values
        self.last_step: int | None = None
        self.offset = 0

    def active(self) -> bool:
        return self.every_n_steps > 0 and bool(self.tasks) and self.stage in self.stages

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.resolve_stage(trainer, pl_module)
        self.items, self.last, self.last_step = {}, {}, None
        if not self.active():
            return
        resumed = trainer.global_step > 0
        if self.first and not resumed:
            (self.out_dir / BENCH_CSV).unlink(missing_ok=True)
        self.offset = stage_offset(self.out_dir, self.stage, bool(self.first))
        for task in self.tasks:
            with FAILURES.guard(f"benchmark {task}"):
                bench = build_task(task, self.configs.get(task) or {})
                self.items[task] = (bench, subset(bench.read(), self.n_items))
        if self.items and not resumed:
            self.evaluate(trainer, pl_module)

    def has_work(self) -> bool:
        return bool(self.items)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step, self.last_step = trainer.global_step, trainer.global_step
        # FSDP shards the weights: every rank must run the same forwards, so no sharding
        shard = "fsdp" not in type(trainer.strategy).__name__.lower()
        meta = {"stage": self.stage, "step": step, "run_step": self.offset + step}
        for task, (bench, items) in self.items.items():
            t = time.perf_counter()
            with FAILURES.guard(f"benchmark {task}"):
                answers = generate_answers(
                    pl_module.backbone, items, self.batch_size, bench.max_new_tokens, shard
                )
                scores = {k: float(v) for k, v in score_answers(bench, items, answers).items()}
                rows = [
                    {**meta, "task": task, "n": len(items), "metric": k, "value": v}
                    for k, v in scores.items()
                ]
                append_csv(self.out_dir / BENCH_CSV, rows)
                logged = {f"bench/{k}": v for k, v in scores.items()}
                self.last.update(logged)
                log_scalars(trainer, logged, step)
                log.debug("bench %s step %d (%.1fs)", task, step, time.perf_counter() - t)


def benchmark_summary(trainer: L.Trainer) -> dict[str, float]:
    """The last `bench/...` values of the trainer's BenchmarkCurve (results.json), or {}."""
    out: dict[str, float] = {}
    for cb in trainer.callbacks:
        if isinstance(cb, BenchmarkCurve):
            out.update(cb.last)
    return out
