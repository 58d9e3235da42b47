"""The two-stage algorithm, orchestrated: base SFT → SFT-C → (π_ref ← π_θ) → CW-DPO → eval.

Each stage is its own Lightning `Trainer.fit` over its own LightningModule/DataModule; the
backbone object is handed from stage to stage. After every stage the policy is saved in HF
format (so `stage=cw_dpo model.path=<that dir>` starts stage 2 alone) and evaluated.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from cwdpo.callbacks.faults import reliability_callbacks
from cwdpo.callbacks.wandb_logger import finish_run
from cwdpo.data.datamodules import PreferenceDataModule, split_records
from cwdpo.errors import DataError
from cwdpo.model.backbone import VLMBackbone
from cwdpo.run.attempts import begin_attempt
from cwdpo.run.config_schema import STAGES, check_stage_order
from cwdpo.run.evaluation import evaluate_captioning
from cwdpo.run.results import finish_results, new_results, stage_results, token_budget_summary
from cwdpo.run.run_state import RunState, resume_dir
from cwdpo.run.stage_nodes import check_stage_node
from cwdpo.run.token_budget import check_token_budgets
from cwdpo.utils.checkpoint_io import AtomicCheckpointIO
from cwdpo.utils.dist import is_rank_zero
from cwdpo.utils.io import atomic_save_dir, atomic_write_json, atomic_write_text
from cwdpo.utils.safe_log import FAILURES, guard_logger
from cwdpo.utils.strategies import unshard_backbone

log = logging.getLogger(__name__)


def stages_to_run(cfg: DictConfig) -> list[str]:
    """`stage.run` minus `stage.skip` (e.g. skip base_sft when starting from a trained policy)."""
    skip = set(cfg.stage.get("skip") or [])
    return [s for s in cfg.stage.run if s not in skip]


def stage_seed(cfg: DictConfig) -> int:
    """The seed of the stages' randomness, seed + stage_seed_offset (the data follows `seed`)."""
    return int(cfg.seed) + int(cfg.get("stage_seed_offset") or 0)


def build_datamodule(
    name: str, cfg: DictConfig, source: Any, records: dict[str, list], backbone: VLMBackbone
) -> L.LightningDataModule:
    """The stage's LightningDataModule: `stage.<name>.datamodule` (a partial), given the
    source, the stage's train rows and the loader settings of `data`."""
    datamodule = hydra.utils.instantiate(cfg.stage[name].datamodule)
    return datamodule(
        source,
        records[name],
        collate=backbone.collate,
        collate_pairs=backbone.collate_pairs,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        seed=stage_seed(cfg),
        val_records=records["val"],
    )


def build_module(name: str, cfg: DictConfig, backbone: VLMBackbone) -> L.LightningModule:
    """The stage's LightningModule: `stage.<name>.module` as Hydra builds it (its optimizer,
    scheduler, objective and total_steps point at the stage's nodes), given the backbone."""
    return hydra.utils.instantiate(cfg.stage[name].module, backbone=backbone)


def build_trainer(name: str, cfg: DictConfig, out_dir: Path, extra_callbacks: list) -> L.Trainer:
    loggers = [  # a failing logger write is a counted warning, never a stopped run
        guard_logger(hydra.utils.instantiate(lg)) for lg in (cfg.get("logger") or {}).values()
    ]
    callbacks = [hydra.utils.instantiate(cb) for cb in (cfg.get("callbacks") or {}).values()]
    for cb in callbacks:
        if isinstance(cb, L.pytorch.callbacks.ModelCheckpoint):
            cb.dirpath = str(out_dir / "checkpoints" / name)
    first = name == stages_to_run(cfg)[0]
    # probes / dynamics / W&B / the CSV logger (its version): stage name, run dir, first stage?
    for obj in loggers + callbacks:
        if hasattr(obj, "set_stage"):
            obj.set_stage(name, out_dir, first)
    return hydra.utils.instantiate(
        cfg.trainer,
        max_steps=int(cfg.stage[name].steps),
        logger=loggers,
        callbacks=callbacks + extra_callbacks,
        default_root_dir=str(out_dir),
        plugins=[AtomicCheckpointIO()],  # temp file + fsync + rename; weights_only loads
    )


def stage_callbacks(name: str, cfg: DictConfig, dm: L.LightningDataModule) -> list[L.Callback]:
    from cwdpo.callbacks.on_policy import OnPolicyNegatives
    from cwdpo.callbacks.progress import stage_progress_bar

    cbs: list[L.Callback] = []
    own_bar = any(
        "ProgressBar" in str(c.get("_target_", "")) for c in (cfg.get("callbacks") or {}).values()
    )
    if cfg.trainer.get("enable_progress_bar", True) and not own_bar:
        cbs.append(stage_progress_bar(name))  # "<stage> · epoch e … step s/max_steps"
    if isinstance(dm, PreferenceDataModule) and dm.needs_on_policy:
        cbs.append(OnPolicyNegatives(every_n_steps=dm.neg.refresh_every_n_steps))
    return cbs


_FROM_CFG: Any = object()


def resolve_resume(cfg: DictConfig) -> Path | None:
    """`resume` → the run directory to continue (None: a fresh run). `resume=<run dir>`: the
    whole run (checkpoints, results, CSV logs) goes there, so `paths.output_dir` is set to it."""
    run_dir = resume_dir(cfg.get("resume"), cfg.paths.output_dir)
    if run_dir is not None and run_dir != Path(cfg.paths.output_dir):
        cfg.paths.output_dir = str(run_dir)
    return run_dir


def run_pipeline(cfg: DictConfig, resume_to: Path | None = _FROM_CFG) -> dict[str, Any]:
    """Run the configured stages and return (and write) the results dict.

    `resume_to`: the run directory to continue, as `resolve_resume(cfg)` returned it (None: a
    fresh run); `cwdpo.train` resolves it once, before it claims the run directory. Left out,
    it is resolved here from `cfg.resume`.

    The W&B run the pipeline opens is closed on success, on error and on Ctrl-C (as the
    lightning-hydra-template's `task_wrapper` does), so nothing is left open in the process.
    """
    if resume_to is _FROM_CFG:
        resume_to = resolve_resume(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    FAILURES.reset()
    results: dict[str, Any] | None = None
    try:
        results = _run_stages(cfg, out_dir, resuming=resume_to is not None)
        return results
    finally:
        finish_run(out_dir, results, exit_code=0 if results is not None else 1)


@dataclass
class RunContext:
    """What every stage of one run shares: the config, the run directory, the data source and
    its rows per stage, the test rows, the resume state."""

    cfg: DictConfig
    out_dir: Path
    source: Any
    records: dict[str, list]
    test: list
    state: RunState
    resuming: bool
    budget: dict[str, dict[str, int]] | None = None  # token-budget counts per row group

    def evaluate(self, backbone: VLMBackbone, baseline: list[str] | None) -> tuple[dict, list]:
        ev = self.cfg.eval
        return evaluate_captioning(
            backbone,
            self.source,
            self.test,
            baseline=baseline,
            batch_size=ev.batch_size,
            max_new_tokens=ev.max_new_tokens,
            calibration=ev.calibration,
            caption_metrics=ev.caption_metrics,
            meteor=ev.get("meteor", True),
        )

    def done(self, name: str) -> dict[str, Any] | None:
        """The finished-stage marker of `name` when resuming (None: the stage has to run)."""
        return self.state.load_done(name) if self.resuming else None


def stage_records(cfg: DictConfig, source: Any, run: list[str]) -> dict[str, list]:
    """Train rows per stage (all of them for base SFT, `data.stage_split` parts for the others) and
    `val`; fails before any training, naming the stage that would get no rows."""
    train = source.captions("train")
    parts = split_records(train, dict(cfg.data.stage_split))
    base = getattr(source, "base_records", lambda: None)()  # a disjoint base-SFT split, if any
    records = {"base_sft": train if base is None else base, "val": source.captions("val"), **parts}
    for name in run:
        if not records.get(name):
            raise DataError(
                f"stage {name} gets no training rows: data.stage_split="
                f"{dict(cfg.data.stage_split)} of {len(train)} train rows"
            )
    return records


def _run_stages(cfg: DictConfig, out_dir: Path, resuming: bool) -> dict[str, Any]:
    t0 = time.time()
    run = stages_to_run(cfg)
    check_stage_order(run)
    for name in run:  # config typos fail before any model is loaded
        check_stage_node(name, cfg)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_num_threads(max(1, int(cfg.get("num_threads") or torch.get_num_threads())))

    backbone: VLMBackbone = hydra.utils.instantiate(cfg.model)
    source = hydra.utils.instantiate(cfg.data.source)
    records = stage_records(cfg, source, run)
    test = source.captions(cfg.eval.split)[: cfg.eval.n_records]
    # every row's tokens against model.max_length, before anything trains (or evaluates)
    records, test, budget = check_token_budgets(cfg, backbone, source, records, test, run)
    ctx = RunContext(cfg, out_dir, source, records, test, RunState(out_dir), resuming, budget)
    results = new_results(cfg, run)
    results["token_budget"] = budget
    # Resume (docs/reliability.md): finished stages are skipped (results from their markers),
    # an unfinished one continues from its last.ckpt; a fresh run drops stale markers/ckpts.
    earlier = begin_attempt(out_dir, t0, resuming, write=is_rank_zero())  # wall time: all attempts
    if not resuming:
        ctx.state.clear(run)
    done = ctx.done("start")
    if done is None:
        metrics, outputs = ctx.evaluate(backbone, None)
        if is_rank_zero():
            ctx.state.mark_done("start", metrics, outputs)
    else:
        metrics, outputs = done["metrics"], done["outputs"]
    results["stages"]["start"] = metrics
    policy_from: Path | None = None  # HF dir of the last finished (skipped) stage
    for name in run:
        done = ctx.done(name)
        if done is not None:
            log.info("resume: stage %s already done (%s): skipped", name, ctx.state.marker(name))
            results["stages"][name], outputs = done["metrics"], done["outputs"]
            policy_from = ctx.state.hf_dir(name)
            continue
        if policy_from is not None:  # π_θ ← the policy saved by the last finished stage
            backbone = hydra.utils.instantiate(cfg.model, path=str(policy_from))
            policy_from = None
        backbone, results["stages"][name], outputs = run_stage(name, ctx, backbone, outputs)
    finish_results(results, out_dir, t0, earlier)
    return results


def run_stage(
    name: str, ctx: RunContext, backbone: VLMBackbone, outputs: list[str]
) -> tuple[VLMBackbone, dict[str, Any], list[str]]:
    """One stage: data module, LightningModule, callbacks, trainer, fit (from its last.ckpt when
    resuming), HF save, evaluation (win-rate against the previous stage's `outputs`), marker.
    Returns the (possibly re-created) backbone, the stage's metrics and its test captions."""
    cfg, state = ctx.cfg, ctx.state
    L.seed_everything(stage_seed(cfg) + STAGES.index(name), workers=True)  # per stage: resumable
    ts, failures_before = time.time(), FAILURES.snapshot()
    cut_before = backbone.truncation_stats.cut_rows
    dm = build_datamodule(name, cfg, ctx.source, ctx.records, backbone)
    module = build_module(name, cfg, backbone)
    if getattr(module, "needs_reference", False) and not backbone.has_reference:
        backbone.snapshot_reference()  # π_ref ← π_θ (on resume: the sft_c output, not a ckpt)
    trainer = build_trainer(
        name, cfg, ctx.out_dir, stage_callbacks(name, cfg, dm) + reliability_callbacks(name, cfg)
    )
    ckpt = state.last_checkpoint(name) if ctx.resuming else None
    if ckpt is not None:
        log.info("resume: stage %s continues from %s", name, ckpt)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    if getattr(module, "_sharded", False):  # FSDP2: plain weights again, on every rank
        backbone = unshard_backbone(backbone, lambda: hydra.utils.instantiate(cfg.model))
    if is_rank_zero():  # under DDP every rank runs the pipeline; one writes
        atomic_save_dir(state.hf_dir(name), backbone.save_pretrained)
    metrics, new_outputs = ctx.evaluate(backbone, outputs if cfg.eval.winrate else None)
    metrics.update(stage_results(name, cfg, trainer, dm, backbone, ts, failures_before))
    metrics["token_budget"] = token_budget_summary(
        (ctx.budget or {}).get(name), dm, backbone, cut_before
    )
    if is_rank_zero():
        state.mark_done(name, metrics, new_outputs)  # after the HF save and the evaluation
    trainer.strategy.barrier("cwdpo-stage-done")
    log.info("stage %s done in %.1fs", name, metrics["train_seconds"])
    return backbone, metrics, new_outputs


def dump_config(cfg: DictConfig, out_dir: Path) -> None:
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_json(
        out_dir / "config.json",
        json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True), default=str)),
    )
