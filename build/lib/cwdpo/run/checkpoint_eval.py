"""Evaluate a saved checkpoint on the configured tasks (`python -m cwdpo.eval`): captioning,
teacher-forced calibration, win-rate against another checkpoint, multiple choice (option
log-likelihood), and the benchmarks scored as the field scores them (POPE, MMMU, MMBench, ...:
cwdpo.run.benchmark_eval); writes eval.json and eval.md into the run's output dir."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from cwdpo.metrics.benchmarks.registry import BENCHMARKS

TASKS = ("captioning", "calibration", "winrate", "multiple_choice", *BENCHMARKS)


def _load(cfg: DictConfig, path: str | None):
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if path is not None:
        model_cfg["path"] = str(path)
    backbone = hydra.utils.instantiate(model_cfg)
    if torch.cuda.is_available():  # under torchrun: this rank's GPU
        backbone.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return backbone


def _init_distributed() -> bool:
    """Under torchrun (WORLD_SIZE > 1) join the process group, so that the benchmark tasks
    generate one shard per rank and gather the answers; True when this call created it."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return True
    return False


def _close_distributed(owned: bool) -> None:
    """Leave a group `_init_distributed` created (gloo threads alive at exit can abort)."""
    import torch.distributed as dist

    if owned and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    tasks = list(cfg.eval.tasks)
    judge = _judge(cfg, tasks)
    from cwdpo.run.benchmark_eval import check_tasks

    check_tasks(cfg, tasks)
    owned = _init_distributed()
    try:
        return _evaluate(cfg, tasks, judge)
    finally:
        _close_distributed(owned)


def _evaluate(cfg: DictConfig, tasks: list[str], judge: Any) -> dict[str, Any]:
    from cwdpo.run.benchmark_eval import needs_model, run_benchmarks

    backbone = _load(cfg, cfg.ckpt) if needs_model(cfg, tasks) else None
    ckpt = (cfg.ckpt or cfg.model.path) if backbone is not None else "saved predictions"
    results: dict[str, Any] = {"ckpt": ckpt}
    if {"captioning", "calibration", "winrate"} & set(tasks):
        results.update(_caption_tasks(cfg, backbone, tasks, judge))
    if "multiple_choice" in tasks:
        results.update({f"mc/{k}": v for k, v in _multiple_choice(cfg, backbone).items()})
        results["mc/protocol"] = "option log-likelihood (not comparable to published tables)"
    results.update(run_benchmarks(cfg, backbone, tasks))
    table = _write(Path(cfg.paths.output_dir), results)
    print("\n" + table)
    return results


def _judge(cfg: DictConfig, tasks: list[str]) -> Any:
    """The configured win-rate judge (None: the default judges), after checking the tasks and
    that the judge's API key is set, before any model runs (not at request 1)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"eval.tasks has unknown task(s) {unknown}; choose from {list(TASKS)}")
    if "winrate" in tasks and not cfg.compare:
        raise ValueError("eval.tasks includes winrate but no `compare=<model dir>` was given")
    judge = hydra.utils.instantiate(cfg.judge) if "winrate" in tasks and cfg.get("judge") else None
    key_env = getattr(judge, "api_key_env", None)
    if key_env and not os.environ.get(key_env):
        raise ValueError(
            f"judge: the environment variable {key_env} (judge.api_key_env) is not set; "
            "export it, or set judge.api_key_env=null for a server without auth"
        )
    return judge


def _caption_tasks(cfg: DictConfig, backbone: Any, tasks: list[str], judge: Any) -> dict[str, Any]:
    """Captioning metrics, win-rate vs the `compare` checkpoint's captions, calibration."""
    from cwdpo.run.evaluation import (
        evaluate_captioning,
        generate_captions,
        teacher_forced_calibration,
    )

    results: dict[str, Any] = {}
    source = hydra.utils.instantiate(cfg.data.source)
    records = source.captions(cfg.eval.split)[: cfg.eval.n_records]
    baseline = None
    if "winrate" in tasks:
        other = _load(cfg, cfg.compare)
        baseline = generate_captions(
            other, records, source.prompt, cfg.eval.batch_size, cfg.eval.max_new_tokens
        )
        results["compare"] = cfg.compare
        del other
    if "captioning" in tasks or baseline is not None:
        metrics, _ = evaluate_captioning(
            backbone,
            source,
            records,
            baseline=baseline,
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            calibration=False,
            caption_metrics="captioning" in tasks,
            judge=judge,
        )
        results.update(metrics)
    if "calibration" in tasks:
        cal = teacher_forced_calibration(backbone, records, source.prompt, cfg.eval.batch_size)
        results.update({f"calib/{k}": v for k, v in cal.items()})
    return results


def _write(out_dir: Path, results: dict[str, Any]) -> str:
    """eval.json and eval.md (the results table, + multiple choice); returns the table."""
    from cwdpo.run.benchmark_eval import benchmark_table
    from cwdpo.run.results import TABLE_KEYS, results_table
    from cwdpo.utils.dist import rank_world
    from cwdpo.utils.io import atomic_write_json, atomic_write_text

    if rank_world()[0] != 0:  # under torchrun every rank evaluates (its shard); one writes
        return ""
    atomic_write_json(out_dir / "eval.json", results)
    table = ""
    if any(k in results for k, _ in TABLE_KEYS):  # not for benchmark-only evaluations
        table = results_table({"stages": {Path(str(results["ckpt"])).name: results}})
    mc = {k: v for k, v in results.items() if k.startswith("mc/") and k != "mc/protocol"}
    if mc:
        table += "\n| multiple choice (option log-likelihood) | value |\n|---|---|\n" + "".join(
            f"| {k} | {v:.2f} |\n" for k, v in mc.items()
        )
    table += benchmark_table(results)
    atomic_write_text(out_dir / "eval.md", table)
    return table


def _multiple_choice(cfg: DictConfig, backbone: Any) -> dict[str, float]:
    from cwdpo.data.multiple_choice import read_mmbench, read_mmmu
    from cwdpo.run.evaluation import evaluate_multiple_choice

    mc = cfg.mc
    if mc.format == "mmbench":
        qs = read_mmbench(mc.path)
    elif mc.format == "mmmu":
        qs = read_mmmu(mc.path, split=mc.split)
    else:
        raise ValueError(
            f"mc.format must be 'mmbench' or 'mmmu' for multiple_choice, got {mc.format!r}"
        )
    return evaluate_multiple_choice(
        backbone, qs, circular=bool(mc.circular), scoring=mc.scoring, batch_size=cfg.eval.batch_size
    )
