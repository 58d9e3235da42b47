"""The two-stage algorithm, orchestrated: base SFT → SFT-C → (π_ref ← π_θ) → CW-DPO → eval.

Each stage is its own Lightning `Trainer.fit` over its own LightningModule/DataModule; the
backbone object is handed from stage to stage. After every stage the policy is saved in HF
format (so `stage=cw_dpo model.path=<that dir>` starts stage 2 alone) and evaluated.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from cwdpo.analysis.dynamics_plots import write_run_plots
from cwdpo.callbacks.faults import NonFiniteGuard, reliability_callbacks
from cwdpo.callbacks.probes import probe_summary
from cwdpo.callbacks.wandb_logger import finish_run
from cwdpo.data.datamodules import (
    CaptionDataModule,
    NegativeConfig,
    PreferenceDataModule,
    split_records,
)
from cwdpo.errors import DataError
from cwdpo.model.backbone import VLMBackbone
from cwdpo.run.config_schema import STAGES
from cwdpo.run.config_schema import check_stage_order as _check_stage_order
from cwdpo.run.evaluation import evaluate_captioning, preference_calibration
from cwdpo.stages import CWDPOModule, SFTCModule
from cwdpo.utils.checkpoint import (
    AtomicCheckpointIO,
    RunState,
    begin_attempt,
    end_attempt,
    resume_dir,
)
from cwdpo.utils.dist import is_rank_zero
from cwdpo.utils.io import atomic_save_dir, atomic_write_json, atomic_write_text
from cwdpo.utils.safe_log import FAILURES, guard_logger
from cwdpo.utils.strategies import unshard_backbone

log = logging.getLogger(__name__)


def stages_to_run(cfg: DictConfig) -> list[str]:
    """`stage.run` minus `stage.skip` (e.g. skip base_sft when starting from a trained policy)."""
    skip = set(cfg.stage.get("skip") or [])
    return [s for s in cfg.stage.run if s not in skip]


def build_datamodule(
    name: str, cfg: DictConfig, source: Any, records: dict[str, list], backbone: VLMBackbone
) -> L.LightningDataModule:
    common = {
        "collate": backbone.collate,
        "collate_pairs": backbone.collate_pairs,
        "batch_size": cfg.data.batch_size,
        "num_workers": cfg.data.num_workers,
        "seed": cfg.seed,
        "val_records": records["val"],
    }
    st = cfg.stage[name]
    if name == "cw_dpo":
        neg = NegativeConfig(**OmegaConf.to_container(cfg.negatives, resolve=True))
        return PreferenceDataModule(source, records["cw_dpo"], negatives=neg, **common)
    train = records["all"] if name == "base_sft" else records["sft_c"]
    return CaptionDataModule(
        source, train, gentle_negatives=bool(st.get("gentle_negatives", False)), **common
    )


PLUMBING = {"steps", "optimizer", "scheduler", "gentle_negatives"}  # read by the pipeline itself


def stage_knobs(name: str, cfg: DictConfig) -> tuple[type, dict[str, Any]]:
    """(module class, loss knobs) of a stage; unknown keys raise, naming them."""
    import inspect

    cls = CWDPOModule if name == "cw_dpo" else SFTCModule
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    st = OmegaConf.to_container(cfg.stage[name], resolve=True)
    knobs = {k: v for k, v in st.items() if k not in PLUMBING}
    unknown = sorted(set(knobs) - accepted)
    if unknown:
        raise ValueError(
            f"stage.{name} has unknown key(s) {unknown}; accepted: {sorted(accepted | PLUMBING)}"
        )
    return cls, knobs


def build_module(name: str, cfg: DictConfig, backbone: VLMBackbone) -> L.LightningModule:
    """The stage's LightningModule; every other key of `stage.<name>` is a module argument, so a
    typo (even one added with `+`) fails here, naming the key and the accepted ones."""
    st = cfg.stage[name]
    cls, knobs = stage_knobs(name, cfg)
    return cls(
        backbone,
        optimizer=hydra.utils.instantiate(st.optimizer),
        scheduler=hydra.utils.instantiate(st.scheduler) if st.get("scheduler") else None,
        total_steps=int(st.steps),
        **knobs,
    )


def build_trainer(name: str, cfg: DictConfig, out_dir: Path, extra_callbacks: list) -> L.Trainer:
    loggers = (
        [  # a failing logger write is a counted warning, never a stopped run
            guard_logger(
                hydra.utils.instantiate(
                    lg, **({"version": name} if "CSVLogger" in lg._target_ else {})
                )
            )
            for lg in cfg.logger.values()
        ]
        if cfg.get("logger")
        else []
    )
    callbacks = [hydra.utils.instantiate(cb) for cb in (cfg.get("callbacks") or {}).values()]
    for cb in callbacks:
        if isinstance(cb, L.pytorch.callbacks.ModelCheckpoint):
            cb.dirpath = str(out_dir / "checkpoints" / name)
    first = name == stages_to_run(cfg)[0]
    for obj in loggers + callbacks:  # probes / dynamics / W&B: stage name, run dir, first stage?
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
    if name == "cw_dpo" and isinstance(dm, PreferenceDataModule) and dm.needs_on_policy:
        cbs.append(OnPolicyNegatives(every_n_steps=dm.neg.refresh_every_n_steps))
    return cbs


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured stages and return (and write) the results dict.

    The W&B run the pipeline opens is closed on success, on error and on Ctrl-C (as the
    lightning-hydra-template's `task_wrapper` does), so nothing is left open in the process.
    """
    resume_to = resume_dir(cfg.get("resume"), cfg.paths.output_dir)
    if resume_to is not None and resume_to != Path(cfg.paths.output_dir):
        cfg.paths.output_dir = str(resume_to)  # resume=<run dir>: everything goes there
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    FAILURES.reset()
    results: dict[str, Any] | None = None
    try:
        results = _run_stages(cfg, out_dir, resume_to)
        return results
    finally:
        finish_run(out_dir, results, exit_code=0 if results is not None else 1)


def _run_stages(cfg: DictConfig, out_dir: Path, resume_to: Path | None) -> dict[str, Any]:
    t0 = time.time()
    run = stages_to_run(cfg)
    _check_stage_order(run)
    for name in run:  # config typos fail before any model is loaded
        stage_knobs(name, cfg)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_num_threads(max(1, int(cfg.get("num_threads") or torch.get_num_threads())))

    backbone: VLMBackbone = hydra.utils.instantiate(cfg.model)
    source = hydra.utils.instantiate(cfg.data.source)
    train = source.captions("train")
    parts = split_records(train, dict(cfg.data.stage_split))
    base = getattr(source, "base_records", lambda: None)()  # a disjoint base-SFT split, if any
    records = {"all": train if base is None else base, "val": source.captions("val"), **parts}
    for name in run:  # fail before any training, naming the stage that would get no rows
        if not records.get("all" if name == "base_sft" else name):
            raise DataError(
                f"stage {name} gets no training rows: data.stage_split="
                f"{dict(cfg.data.stage_split)} of {len(train)} train rows"
            )
    ev = cfg.eval
    test = source.captions(ev.split)[: ev.n_records]

    def evaluate(baseline):
        return evaluate_captioning(
            backbone,
            source,
            test,
            baseline=baseline,
            batch_size=ev.batch_size,
            max_new_tokens=ev.max_new_tokens,
            calibration=ev.calibration,
            caption_metrics=ev.caption_metrics,
            meteor=ev.get("meteor", True),
        )

    results: dict[str, Any] = {
        "config": {
            "experiment": cfg.get("experiment_name", "default"),
            "stages": run,
            "seed": cfg.seed,
        },
        "stages": {},
    }
    # Resume (docs/reliability.md): finished stages are skipped (results from their markers),
    # an unfinished one continues from its last.ckpt; a fresh run drops stale markers/ckpts.
    state = RunState(out_dir)
    resuming = resume_to is not None
    earlier = begin_attempt(out_dir, t0, resuming, write=is_rank_zero())  # wall time: all attempts
    if not resuming:
        state.clear(run)
    done = state.load_done("start") if resuming else None
    if done is None:
        metrics, outputs = evaluate(None)
        if is_rank_zero():
            state.mark_done("start", metrics, outputs)
    else:
        metrics, outputs = done["metrics"], done["outputs"]
    results["stages"]["start"] = metrics
    policy_from: Path | None = None  # HF dir of the last finished (skipped) stage
    for name in run:
        done = state.load_done(name) if resuming else None
        if done is not None:
            log.info("resume: stage %s already done (%s): skipped", name, state.marker(name))
            results["stages"][name], outputs = done["metrics"], done["outputs"]
            policy_from = state.hf_dir(name)
            continue
        if policy_from is not None:  # π_θ ← the policy saved by the last finished stage
            backbone = hydra.utils.instantiate(cfg.model, path=str(policy_from))
            policy_from = None
        L.seed_everything(cfg.seed + STAGES.index(name), workers=True)  # per stage: resumable
        ts, failures_before = time.time(), FAILURES.snapshot()
        if name == "cw_dpo" and not backbone.has_reference:
            backbone.snapshot_reference()  # π_ref ← π_θ (on resume: the sft_c output, not a ckpt)
        dm = build_datamodule(name, cfg, source, records, backbone)
        module = build_module(name, cfg, backbone)
        trainer = build_trainer(
            name, cfg, out_dir, stage_callbacks(name, cfg, dm) + reliability_callbacks(name, cfg)
        )
        ckpt = state.last_checkpoint(name) if resuming else None
        if ckpt is not None:
            log.info("resume: stage %s continues from %s", name, ckpt)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        if getattr(module, "_sharded", False):  # FSDP2: plain weights again, on every rank
            backbone = unshard_backbone(backbone, lambda: hydra.utils.instantiate(cfg.model))
        if is_rank_zero():  # under DDP every rank runs the pipeline; one writes
            atomic_save_dir(state.hf_dir(name), backbone.save_pretrained)
        metrics, new_outputs = evaluate(outputs if ev.winrate else None)
        metrics["objective"] = objective_name(name, cfg)  # which loss ran (table, report)
        metrics["train_seconds"] = time.time() - ts
        metrics["steps"] = int(trainer.global_step)
        metrics["nonfinite_skipped_steps"] = sum(
            cb.skipped for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard)
        )
        metrics.update(probe_summary(trainer))  # early_stop reason (None = ran to max_steps)
        metrics["logging_failures"] = FAILURES.since(failures_before)
        if isinstance(dm, PreferenceDataModule):
            metrics.update(preference_calibration(backbone, dm, float(cfg.stage[name].beta)))
            total = sum(dm.stats.counts.values())
            metrics["negatives"] = {
                "sources": dict(dm.stats.counts),
                "dataset_fraction": sum(
                    v
                    for k, v in dm.stats.counts.items()
                    if k != "on_policy" and not k.startswith("self:")
                )
                / max(1, total),
                "refresh_steps": dm.stats.refresh_steps,
                "dropped_as_positive": dm.stats.rejected_as_positive,
                "on_policy_fallback": dm.stats.on_policy_fallback,
            }
        results["stages"][name] = metrics
        if is_rank_zero():
            state.mark_done(name, metrics, new_outputs)  # after the HF save and the evaluation
        trainer.strategy.barrier("cwdpo-stage-done")
        outputs = new_outputs
        log.info("stage %s done in %.1fs", name, metrics["train_seconds"])
    results["wall_seconds"] = sum(earlier) + time.time() - t0
    results["attempt_wall_seconds"] = [*earlier, time.time() - t0]
    results["logging_failures"] = FAILURES.snapshot()
    table = results_table(results)
    if is_rank_zero():
        atomic_write_json(out_dir / "results.json", results)
        atomic_write_text(out_dir / "results.md", table)
        write_run_plots(out_dir)
        if FAILURES.snapshot() != results["logging_failures"]:  # a plot failed: count it too
            results["logging_failures"] = FAILURES.snapshot()
            atomic_write_json(out_dir / "results.json", results)
        end_attempt(out_dir, time.time())
    print("\n" + table)
    return results


TABLE_KEYS = (
    ("fact_accuracy", "facts %"),
    ("exact", "exact %"),
    ("cider", "CIDEr"),
    ("bleu_4", "BLEU-4"),
    ("meteor", "METEOR"),
    ("rouge_l", "ROUGE-L"),
    ("calib/ece", "ECE"),
    ("calib/entropy", "entropy"),
    ("calib/mean_top1_prob", "top-1 p"),
    ("pref_calib/ece", "pref ECE"),
    ("winrate/win_rate", "win vs prev"),
    # ShapesWorld ground truth (cwdpo.metrics.hallucination / .teacher_forced), percent
    ("f1", "F1 %"),
    ("object_recall", "obj recall %"),
    ("chair_i", "CHAIR_i %"),
    ("chair_s", "CHAIR_s %"),
    ("companion_halluc", "companion halluc %"),
    ("pope/f1", "POPE F1"),
    ("pope/yes_ratio", "POPE yes %"),
    ("pope_adv/accuracy", "POPE-adv acc"),
    ("malformed", "malformed %"),
    ("length", "length"),
    ("calib/content_ece", "content ECE"),
    ("calib/content_sce", "content SCE"),
    ("disp/chosen_fell", "gold logp fell %"),
)


def objective_name(stage: str, cfg: DictConfig) -> str:
    """The loss a stage trained with, from its knobs: sft, sft_c (soft|hard), cw_dpo, dpo,
    ipo, cw_ipo, rpo, ... (+filter with negative filtering)."""
    st = cfg.stage[stage]
    if stage != "cw_dpo":
        if not float(st.get("lam", 0.0)) or not st.get("gentle_negatives", stage == "sft_c"):
            return "sft"
        return "sft_c" + ("(hard)" if st.get("constraint") == "hard" else "")
    name = "ipo" if st.get("loss_type") == "ipo" else "dpo"
    if float(st.get("rpo_alpha") or 0.0) > 0:
        name = "rpo" if name == "dpo" else f"{name}+nll"
    if st.get("cooling", True):
        name = f"cw_{name}"
    return name + ("+filter" if st.get("filter_threshold") is not None else "")


def results_table(results: dict[str, Any]) -> str:
    stages = results["stages"]
    first = next(iter(stages.values()))
    keys = [(k, h) for k, h in TABLE_KEYS if any(k in m for m in stages.values()) or k in first]
    objective = any("objective" in m for m in stages.values())
    lines = [
        "| stage | "
        + ("objective | " if objective else "")
        + " | ".join(h for _, h in keys)
        + " |",
        "|---" * (len(keys) + 1 + objective) + "|",
    ]
    for name, m in stages.items():
        cells = [m.get("objective", "–")] if objective else []
        for k, _ in keys:
            v = m.get(k)
            cells.append(
                "–"
                if v is None
                else f"{v:.3f}"
                if "calib" in k or k.startswith("win")
                else f"{v:.1f}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def dump_config(cfg: DictConfig, out_dir: Path) -> None:
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_json(
        out_dir / "config.json",
        json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True), default=str)),
    )
