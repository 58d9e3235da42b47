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

from cwdpo.backbone import VLMBackbone
from cwdpo.data.datamodules import (
    CaptionDataModule,
    NegativeConfig,
    PreferenceDataModule,
    split_records,
)
from cwdpo.evaluation import evaluate_captioning
from cwdpo.stages import CWDPOModule, SFTCModule
from cwdpo.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

STAGES = ("base_sft", "sft_c", "cw_dpo")


def _check_stage_order(run: list[str]) -> None:
    unknown = [s for s in run if s not in STAGES]
    if unknown:
        raise ValueError(f"stage.run has unknown stage(s) {unknown}; choose from {list(STAGES)}")
    order = [STAGES.index(s) for s in run]
    if order != sorted(order) or len(set(run)) != len(run):
        raise ValueError(f"stage.run must follow base_sft → sft_c → cw_dpo without repeats, got {run}")


def build_datamodule(name: str, cfg: DictConfig, source: Any, records: dict[str, list]) -> L.LightningDataModule:
    common = {
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
    return CaptionDataModule(source, train, gentle_negatives=bool(st.get("gentle_negatives", False)), **common)


def build_module(name: str, cfg: DictConfig, backbone: VLMBackbone) -> L.LightningModule:
    st = cfg.stage[name]
    common = {
        "optimizer": hydra.utils.instantiate(st.optimizer),
        "scheduler": hydra.utils.instantiate(st.scheduler) if st.get("scheduler") else None,
        "total_steps": int(st.steps),
    }
    if name == "cw_dpo":
        return CWDPOModule(
            backbone, beta=st.beta, cooling=st.cooling, floor=st.floor, tau=st.tau,
            filter_threshold=st.filter_threshold, loss_type=st.loss_type, rpo_alpha=st.rpo_alpha,
            **common,
        )
    return SFTCModule(
        backbone, lam=st.get("lam", 0.0), margin_c=st.get("margin_c", 0.0),
        reduction=st.get("reduction", "mean"), label_smoothing=st.get("label_smoothing", 0.0),
        constraint=st.get("constraint", "soft"), **common,
    )


def build_trainer(name: str, cfg: DictConfig, out_dir: Path, extra_callbacks: list) -> L.Trainer:
    loggers = [
        hydra.utils.instantiate(lg, **({"version": name} if "CSVLogger" in lg._target_ else {}))
        for lg in cfg.logger.values()
    ] if cfg.get("logger") else []
    callbacks = [hydra.utils.instantiate(cb) for cb in (cfg.get("callbacks") or {}).values()]
    for cb in callbacks:
        if isinstance(cb, L.pytorch.callbacks.ModelCheckpoint):
            cb.dirpath = str(out_dir / "checkpoints" / name)
    return hydra.utils.instantiate(
        cfg.trainer, max_steps=int(cfg.stage[name].steps), logger=loggers,
        callbacks=callbacks + extra_callbacks, default_root_dir=str(out_dir),
    )


def stage_callbacks(name: str, cfg: DictConfig, dm: L.LightningDataModule) -> list[L.Callback]:
    from cwdpo.callbacks.on_policy import OnPolicyNegatives

    if name == "cw_dpo" and isinstance(dm, PreferenceDataModule) and dm.needs_on_policy:
        return [OnPolicyNegatives(every_n_steps=dm.neg.refresh_every_n_steps)]
    return []


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured stages and return (and write) the results dict."""
    t0 = time.time()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = list(cfg.stage.run)
    _check_stage_order(run)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_num_threads(max(1, int(cfg.get("num_threads") or torch.get_num_threads())))

    backbone: VLMBackbone = hydra.utils.instantiate(cfg.model)
    source = hydra.utils.instantiate(cfg.data.source)
    train = source.captions("train")
    parts = split_records(train, dict(cfg.data.stage_split))
    records = {"all": train, "val": source.captions("val"), **parts}
    ev = cfg.eval
    test = source.captions(ev.split)[: ev.n_records]

    def evaluate(baseline):
        return evaluate_captioning(
            backbone, source, test, baseline=baseline, batch_size=ev.batch_size,
            max_new_tokens=ev.max_new_tokens, calibration=ev.calibration,
            caption_metrics=ev.caption_metrics,
        )

    results: dict[str, Any] = {"config": {"experiment": cfg.get("experiment_name", "default"),
                                          "stages": run, "seed": cfg.seed}, "stages": {}}
    metrics, outputs = evaluate(None)
    results["stages"]["start"] = metrics
    for name in run:
        ts = time.time()
        if name == "cw_dpo" and not backbone.has_reference:
            backbone.snapshot_reference()  # π_ref ← π_θ
        dm = build_datamodule(name, cfg, source, records)
        dm.attach(backbone.collate, backbone.collate_pairs)
        module = build_module(name, cfg, backbone)
        trainer = build_trainer(name, cfg, out_dir, stage_callbacks(name, cfg, dm))
        trainer.fit(module, datamodule=dm)
        backbone.save_pretrained(out_dir / "checkpoints" / f"{name}_hf")
        metrics, new_outputs = evaluate(outputs if ev.winrate else None)
        metrics["train_seconds"] = time.time() - ts
        metrics["steps"] = int(trainer.global_step)
        if isinstance(dm, PreferenceDataModule):
            total = sum(dm.stats.counts.values())
            metrics["negatives"] = {
                "sources": dict(dm.stats.counts),
                "dataset_fraction": sum(v for k, v in dm.stats.counts.items() if k != "on_policy") / max(1, total),
                "refresh_steps": dm.stats.refresh_steps,
                "dropped_as_positive": dm.stats.rejected_as_positive,
                "on_policy_fallback": dm.stats.on_policy_fallback,
            }
        results["stages"][name] = metrics
        outputs = new_outputs
        log.info("stage %s done in %.1fs", name, metrics["train_seconds"])
    results["wall_seconds"] = time.time() - t0
    atomic_write_json(out_dir / "results.json", results)
    table = results_table(results)
    atomic_write_text(out_dir / "results.md", table)
    print("\n" + table)
    return results


TABLE_KEYS = (
    ("fact_accuracy", "facts %"), ("exact", "exact %"), ("CIDEr", "CIDEr"), ("BLEU-4", "BLEU-4"),
    ("METEOR", "METEOR"), ("ROUGE-L", "ROUGE-L"), ("calib/ece", "ECE"), ("calib/entropy", "entropy"),
    ("calib/mean_top1_prob", "top-1 p"), ("winrate/win_rate", "win vs prev"),
)


def results_table(results: dict[str, Any]) -> str:
    stages = results["stages"]
    first = next(iter(stages.values()))
    keys = [(k, h) for k, h in TABLE_KEYS if any(k in m for m in stages.values()) or k in first]
    lines = ["| stage | " + " | ".join(h for _, h in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for name, m in stages.items():
        cells = []
        for k, _ in keys:
            v = m.get(k)
            cells.append("–" if v is None else f"{v:.3f}" if k.startswith("calib") or k.startswith("win") else f"{v:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def dump_config(cfg: DictConfig, out_dir: Path) -> None:
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_json(out_dir / "config.json", json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True), default=str)))
