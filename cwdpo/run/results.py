"""The results of a pipeline run: what each stage adds to its metrics, the table, the files.

`run_pipeline` (cwdpo/run/pipeline.py) trains and evaluates; this module turns what a finished
stage left behind (its trainer's fault counters and probe summary, its data module's negative
statistics, the logging failures since it started) into the stage's entry of `results.json`,
and writes `results.json` / `results.md` / the plots at the end of the run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from cwdpo.batch import is_dataset_negative
from cwdpo.callbacks.benchmarks import benchmark_summary
from cwdpo.callbacks.faults import NonFiniteGuard
from cwdpo.callbacks.probes import probe_summary
from cwdpo.data.datamodules import PreferenceDataModule
from cwdpo.model.backbone import VLMBackbone
from cwdpo.run.attempts import end_attempt
from cwdpo.run.config_schema import ConfigError
from cwdpo.run.evaluation import preference_calibration
from cwdpo.utils.dist import is_rank_zero
from cwdpo.utils.io import atomic_write_json, atomic_write_text
from cwdpo.utils.safe_log import FAILURES

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


def new_results(cfg: DictConfig, run: list[str]) -> dict[str, Any]:
    """The results dict before any stage: the run's identity and an empty `stages`."""
    return {
        "config": {
            "experiment": cfg.get("experiment_name", "default"),
            "stages": run,
            "seed": cfg.seed,
        },
        "stages": {},
    }


def stage_results(
    name: str,
    cfg: DictConfig,
    trainer: L.Trainer,
    dm: L.LightningDataModule,
    backbone: VLMBackbone,
    started: float,
    failures_before: dict[str, int],
) -> dict[str, Any]:
    """What a trained stage adds to its evaluation metrics: the objective that ran, its wall
    time and steps, skipped non-finite steps, the probes' summary (early-stop reason), the
    logging failures since `failures_before`, and, for a preference stage, the preference
    calibration and where its negatives came from."""
    out: dict[str, Any] = {
        "objective": objective_name(name, cfg),  # which loss ran (table, report)
        "train_seconds": time.time() - started,
        "steps": int(trainer.global_step),
        "nonfinite_skipped_steps": sum(
            cb.skipped for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard)
        ),
    }
    out.update(probe_summary(trainer))  # early_stop reason (None = ran to max_steps)
    out.update(benchmark_summary(trainer))  # the benchmark curve's last bench/<task>/... values
    out["logging_failures"] = FAILURES.since(failures_before)
    if isinstance(dm, PreferenceDataModule):
        out.update(preference_calibration(backbone, dm, float(cfg.stage[name].objective.beta)))
        out["negatives"] = negatives_summary(dm)
    return out


def token_budget_summary(
    preflight: dict[str, int] | None, dm: Any, backbone: VLMBackbone, cut_before: int
) -> dict[str, Any]:
    """The stage's `model.truncation` policy, its rows' token-budget counts from before training
    (cwdpo.run.token_budget) and what collate still cut or the data module dropped."""
    return {
        "policy": backbone.truncation,
        **(preflight or {}),
        "cut_in_batches": backbone.truncation_stats.cut_rows - cut_before,
        "dropped_in_batches": int(getattr(dm, "dropped_over_budget", 0)),
    }


def negatives_summary(dm: PreferenceDataModule) -> dict[str, Any]:
    """Where a preference stage's negatives came from (counts per source, the realised dataset
    fraction, on-policy refreshes and fallbacks, samples dropped as positives)."""
    counts = dm.stats.counts
    dataset = sum(v for k, v in counts.items() if is_dataset_negative(k))
    return {
        "sources": dict(counts),
        "dataset_fraction": dataset / max(1, sum(counts.values())),
        "refresh_steps": dm.stats.refresh_steps,
        "dropped_as_positive": dm.stats.rejected_as_positive,
        "on_policy_fallback": dm.stats.on_policy_fallback,
        # on-policy cost (rank 0's share under DDP): records sampled, captions generated per
        # pair trained (K when each refresh samples just the steps it serves), seconds
        "sampled_records": dm.stats.sampled_records,
        "samples_per_pair": dm.stats.samples_per_pair(),
        "sample_seconds": dm.stats.sample_seconds,
    }


def finish_results(
    results: dict[str, Any], out_dir: Path, started: float, earlier: list[float]
) -> None:
    """Add the run's wall times (`earlier`: those of previous attempts) and logging failures,
    write results.json, results.md and the plots (rank 0), close the attempt, print the table."""
    from cwdpo.analysis.dynamics_plots import write_run_plots

    results["wall_seconds"] = sum(earlier) + time.time() - started
    results["attempt_wall_seconds"] = [*earlier, time.time() - started]
    results["logging_failures"] = FAILURES.snapshot()
    results["config_changes"] = config_changes_by_attempt(out_dir)
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


def config_changes_by_attempt(out_dir: Path) -> dict[str, dict[str, list[Any]]]:
    """{attempt: {key: [old, new]}}: the values a resume changed (`resume_overrides=allow`,
    cwdpo/run/preflight.py); empty when every attempt ran the config the run started with."""
    import json

    found = {}
    for f in (out_dir / "config_history").glob("attempt_*.changes.json"):
        entry = json.loads(f.read_text())
        found[int(entry["attempt"])] = entry["changes"]
    return {str(k): found[k] for k in sorted(found)}


def objective_name(stage: str, cfg: DictConfig) -> str:
    """The loss a stage trained with, from its knobs: sft, sft_c (soft|hard), cw_dpo, dpo,
    ipo, cw_ipo, rpo, ... (+filter with negative filtering)."""
    st = cfg.stage[stage].objective
    if stage != "cw_dpo":
        gentle = cfg.stage[stage].datamodule.get("gentle_negatives", False)
        if not float(st.get("lam", 0.0)) or not gentle:
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


def optimized_metric(results: dict[str, Any], name: str | Sequence[str] | None) -> float | None:
    """The last stage's metric `name` (`optimized_metric`, set by conf/hparams_search/*): what
    a Hydra sweeper maximises. A list names fallbacks, the first the stage has wins (optuna.yaml:
    fact accuracy where the source knows the facts, else CIDEr). None when `name` is null."""
    if not name:
        return None
    names = [name] if isinstance(name, str) else [str(n) for n in name]
    stage, last = list(results["stages"].items())[-1]
    for n in names:
        if n in last:
            return last[n]
    available = sorted(
        k for k, v in last.items() if isinstance(v, int | float) and not isinstance(v, bool)
    )
    shown = repr(names[0]) if len(names) == 1 else repr(names)
    raise ConfigError(
        f"optimized_metric={shown}: the last stage ({stage}) has no such metric; "
        f"available: {available}"
    )
