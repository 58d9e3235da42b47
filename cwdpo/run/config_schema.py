"""One schema for every numeric / choice config value, checked before any model loads.

Why: a bad value (β < 0, τ = 0, a fraction of 1.5, `batch_size=0`) used to surface minutes
into a run, after earlier stages had trained, as a library traceback naming Lightning's or
torch's argument instead of the user's key — or never (β < 0 trains a broken model, rc 0).
`validate_config` reads only the keys listed here (no interpolation elsewhere is resolved, so
the tiny-VLM resolver behind `model.path` never runs) and raises one `ConfigError` naming the
full key, the value and the allowed range. `ConfigError` is a Hydra *compact* exception: the
CLI prints its one line without a traceback unless `HYDRA_FULL_ERROR=1`. Legal but suspicious
values (a stage with 0 steps, a learning rate far outside the usual range of its stage) are
returned as warnings and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, ListConfig, OmegaConf

from cwdpo.rules import (
    Rule,
    about,
    boolean,
    choice,
    either,
    fraction,
    integer,
    is_int,
    is_real,
    positive,
    real,
    string,
)

log = logging.getLogger(__name__)

STAGES = ("base_sft", "sft_c", "cw_dpo")
_ABSENT = object()


class ConfigError(CompactHydraException, ValueError):
    """A config value of the wrong type or out of range (one line: key, value, what is allowed)."""


def check_stage_order(run: list[str]) -> None:
    """`stage.run` names known stages, in pipeline order, without repeats."""
    unknown = [s for s in run if s not in STAGES]
    if unknown:
        raise ConfigError(f"stage.run has unknown stage(s) {unknown}; choose from {list(STAGES)}")
    order = [STAGES.index(s) for s in run]
    if order != sorted(order) or len(set(run)) != len(run):
        raise ConfigError(
            f"stage.run must follow base_sft → sft_c → cw_dpo without repeats, got {run}"
        )


STEPS = integer(0)
COUNT = integer(1)

# Keys of every training stage (the optimizer / scheduler partials are read by the pipeline).
STAGE_COMMON: dict[str, Rule] = {
    "steps": about(STEPS, "optimizer steps of the stage"),
    "optimizer.lr": about(positive(), "learning rate"),
    "optimizer.weight_decay": real(0),
    "optimizer.momentum": real(0, 1),
    "optimizer.eps": positive(),
    "scheduler.warmup_steps": STEPS,
    "scheduler.min_ratio": fraction(),
    "datamodule.gentle_negatives": boolean(),
    "module.prefix_sharing": boolean(),
    "module.ref_cache": string(nullable=True),
    "module.disable_dropout": boolean(),
}
TRAIN_RULES: dict[str, Rule] = {
    "seed": integer(),
    "stage_seed_offset": integer(0),
    "num_threads": integer(1, nullable=True),
    "resume_overrides": choice("refuse", "allow"),
    "faults.policy": choice("skip", "stop", "off"),
    "faults.check_grads": boolean(),
    "faults.max_consecutive_skips": integer(0),
    "eval.n_records": COUNT,
    "eval.batch_size": COUNT,
    "eval.max_new_tokens": COUNT,
    "eval.calibration": boolean(),
    "eval.caption_metrics": boolean(),
    "eval.meteor": boolean(),
    "eval.winrate": boolean(),
    "data.batch_size": about(COUNT, "pairs or captions per batch"),
    "data.num_workers": integer(0),
    "data.source.skip_bad_images": boolean(),
    "data.source.check_images": boolean(),
    "data.skip_unfit_rows": boolean(),
    "model.max_length": COUNT,
    "model.truncation": choice("error", "warn", "drop_pair"),
    "model.dtype": choice("float32", "bfloat16", "float16", nullable=True),
    "model.trust_remote_code": boolean(),
    "model.gradient_checkpointing": boolean(),
    "model.lora.r": COUNT,
    "model.lora.alpha": positive(),
    "model.lora.dropout": real(0, 1, hi_open=True),
    "negatives.kind": choice("dataset", "on_policy", "mixed", "self_judged"),
    "negatives.min_gap": real(0, 1),
    "negatives.easy_mix": fraction(),
    "negatives.pair_rule": choice("best_worst", "companion_edit"),
    "negatives.greedy_candidate": boolean(),
    "data.source.judge": choice("precision", "verifier"),
    "data.source.minimal_negatives": boolean(),
    "negatives.dataset_fraction": about(fraction(), "share of dataset negatives"),
    "negatives.easy_fraction": fraction(),
    "negatives.num_samples": COUNT,
    "negatives.temperature": positive(),
    "negatives.top_p": real(0, 1, lo_open=True),
    "negatives.max_new_tokens": COUNT,
    "negatives.refresh_every_n_steps": COUNT,
    "negatives.generation_batch_size": COUNT,
    "trainer.accumulate_grad_batches": COUNT,
    "trainer.gradient_clip_val": real(0, nullable=True),
    "trainer.log_every_n_steps": COUNT,
    "trainer.limit_val_batches": either(integer(0), fraction()),
    "trainer.num_sanity_val_steps": integer(-1),
    "trainer.check_val_every_n_epoch": COUNT,
    "trainer.deterministic": either(boolean(), choice("warn")),
    "trainer.num_nodes": COUNT,
    "callbacks.model_checkpoint.every_n_train_steps": integer(1, nullable=True),
    "callbacks.probes.every_n_steps": COUNT,
    "callbacks.probes.n_items": COUNT,
    "callbacks.probes.batch_size": COUNT,
    "callbacks.probes.max_cost_frac": real(0, 1, lo_open=True),
    "callbacks.probes.n_samples": integer(0),
    "callbacks.heldout.every_n_steps": integer(0),
    "callbacks.heldout.n_items": COUNT,
    "callbacks.heldout.batch_size": COUNT,
    "callbacks.heldout.max_new_tokens": COUNT,
    "callbacks.benchmarks.every_n_steps": integer(0),
    "callbacks.benchmarks.n_items": COUNT,
    "callbacks.benchmarks.batch_size": COUNT,
    "callbacks.dynamics.grad_split_every_n_steps": integer(0),
    "callbacks.dynamics.record_every_n_steps": COUNT,
    "callbacks.dynamics.histogram_every_n_steps": integer(0),
}
EVAL_RULES: dict[str, Rule] = {
    "seed": integer(),
    "eval.n_records": COUNT,
    "eval.batch_size": COUNT,
    "eval.max_new_tokens": COUNT,
    "model.max_length": COUNT,
    "model.truncation": TRAIN_RULES["model.truncation"],
    "model.dtype": TRAIN_RULES["model.dtype"],
    "mc.circular": boolean(),
    "mc.scoring": choice("letter", "text"),
    "mc.format": choice("mmbench", "mmmu", nullable=True),
    "pope.scoring": choice("generate"),
    "mmmu.scoring": choice("generate", "loglik"),
    "mmbench.scoring": choice("generate", "loglik"),
    **{f"{t}.limit": integer(1, nullable=True) for t in ("pope", "mmmu", "mmbench")},
    **{f"{t}.limit": integer(1, nullable=True) for t in ("chair", "amber", "mmhal")},
    "amber.similarity": choice("spacy", "exact"),
    "amber.answer_rule": choice("yes_word", "exact"),
    "chair.n_images": integer(0),
    "data.source.skip_bad_images": boolean(),
    "data.source.check_images": boolean(),
}

# A learning rate outside these bounds is legal but almost surely a slip (lr=0.1 in stage 2
# collapses the tiny model to 0% facts with rc 0): warn.
USUAL_LR = {"base_sft": (1e-7, 1e-2), "sft_c": (1e-7, 1e-2), "cw_dpo": (1e-8, 5e-3)}
USUAL_BETA = (0.005, 5.0)


# ----------------------------------------------------------------------------- reading values
def _select(cfg: DictConfig, key: str) -> Any:
    """The resolved value at `key` (only that node is resolved), or `_ABSENT`."""
    try:
        v = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
    except Exception as e:  # a missing mandatory value or a broken interpolation
        raise ConfigError(
            f"config key {key}: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None
    if isinstance(v, DictConfig | ListConfig):
        return OmegaConf.to_container(v, resolve=True)
    return v


def _show(v: Any) -> str:
    s = (
        "null"
        if v is None
        else str(v).lower()
        if isinstance(v, bool)
        else repr(v)
        if isinstance(v, str)
        else str(v)
    )
    return s if len(s) <= 60 else s[:57] + "..."


def _check(cfg: DictConfig, rules: Mapping[str, Rule], prefix: str = "") -> list[str]:
    errors = []
    for rel, rule in rules.items():
        key = prefix + rel
        v = _select(cfg, key)
        if v is _ABSENT:
            continue
        bad = rule.violated(v)
        if bad is not None:
            errors.append(f"{key}={_show(v)}: expected {bad}")
    return errors


def _stage_names(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """(stages configured under `stage`, stages that run = stage.run minus stage.skip)."""
    st = cfg.get("stage")
    if st is None:
        return [], []
    configured = [s for s in STAGES if s in st]
    run = _select(cfg, "stage.run")
    skip = _select(cfg, "stage.skip")
    if run is _ABSENT:
        return configured, []
    if not isinstance(run, list) or not all(isinstance(s, str) for s in run):
        raise ConfigError(
            f"stage.run={_show(run)}: expected a list of stage names from {list(STAGES)}"
        )
    skip = [] if skip in (_ABSENT, None) else skip
    if not isinstance(skip, list):
        raise ConfigError(f"stage.skip={_show(skip)}: expected a list of stage names")
    return configured, [s for s in run if s not in set(skip)]


def _stage_warnings(cfg: DictConfig, name: str) -> list[str]:
    out = []
    p = f"stage.{name}."
    steps = _select(cfg, p + "steps")
    if steps == 0:
        out.append(
            f"{p}steps=0: stage {name} will train no step (a no-op stage); "
            f"set {p}steps > 0, or leave it out with stage.skip=[{name}]"
        )
    lr = _select(cfg, p + "optimizer.lr")
    lo, hi = USUAL_LR[name]
    if is_real(lr) and lr > 0 and not lo <= lr <= hi:
        out.append(
            f"{p}optimizer.lr={lr:g} is far outside the usual range [{lo:g}, {hi:g}] for "
            f"stage {name}: expect {'a diverged or collapsed model' if lr > hi else 'no learning'}"
        )
    if name == "cw_dpo":
        beta = _select(cfg, p + "objective.beta")
        if is_real(beta) and beta > 0 and not USUAL_BETA[0] <= beta <= USUAL_BETA[1]:
            out.append(
                f"{p}objective.beta={beta:g} is far outside the usual range "
                f"[{USUAL_BETA[0]:g}, {USUAL_BETA[1]:g}]"
            )
    return out


def _cross_checks(cfg: DictConfig) -> list[str]:
    errors = []
    split = _select(cfg, "data.stage_split")
    if isinstance(split, dict):
        for k, f in split.items():
            if not (is_real(f) and 0 <= f <= 1):
                errors.append(f"data.stage_split.{k}={_show(f)}: expected a fraction in [0, 1]")
        vals = [f for f in split.values() if is_real(f)]
        if vals and len(vals) == len(split) and not 0 < sum(vals) <= 1 + 1e-6:
            errors.append(
                f"data.stage_split={split}: the fractions must sum to a value in (0, 1], "
                f"got {sum(vals):g}"
            )
    sizes = _select(cfg, "data.source.sizes")
    if isinstance(sizes, dict):
        errors += [
            f"data.source.sizes.{k}={_show(n)}: expected an integer >= 0"
            for k, n in sizes.items()
            if not (is_int(n) and n >= 0)
        ]
    kind, frac = _select(cfg, "negatives.kind"), _select(cfg, "negatives.dataset_fraction")
    fixed = (
        {"dataset": 1.0, "on_policy": 0.0, "self_judged": 0.0}.get(kind)
        if isinstance(kind, str)
        else None
    )
    if fixed is not None and is_real(frac) and frac != fixed:
        errors.append(
            f"negatives.dataset_fraction={frac:g}: only negatives=mixed takes a blend; "
            f"negatives={kind} means {fixed}"
        )
    from cwdpo.run.benchmark_eval import callback_config_errors

    return errors + callback_config_errors(cfg)


def validate_config(cfg: DictConfig, task: str = "train") -> list[str]:
    """Check every schema key of a composed `train` (or `eval`) config.

    Raises `ConfigError` (one line, all errors joined by "; ") on a wrong type or range;
    returns (and logs) the warnings for legal but suspicious values.
    """
    errors: list[str] = []
    warnings: list[str] = []
    if task == "train":
        from cwdpo.run.stage_nodes import check_stage_node, objective_error, objective_keys

        errors += _check(cfg, TRAIN_RULES)
        configured, run = _stage_names(cfg)
        if run:
            check_stage_order(run)
        classes = {}
        for name in run:  # unknown keys (typos), before any model loads
            try:
                classes[name] = check_stage_node(name, cfg)["objective"]
            except ConfigError as e:
                errors.append(str(e))
        for name in configured:
            rules = {**STAGE_COMMON, **objective_keys(name, classes.get(name))}
            errors += _check(cfg, rules, prefix=f"stage.{name}.")
        errors += _cross_checks(cfg)
        if not errors:
            errors += [e for name in run if (e := objective_error(name, cfg))]
        if not errors:
            for name in run:
                warnings += _stage_warnings(cfg, name)
    elif task == "eval":
        errors += _check(cfg, EVAL_RULES)
        tasks = _select(cfg, "eval.tasks")
        if isinstance(tasks, list):
            from cwdpo.run.checkpoint_eval import TASKS

            errors += [
                f"eval.tasks[{i}]={_show(t)}: expected one of {list(TASKS)}"
                for i, t in enumerate(tasks)
                if t not in TASKS
            ]
    else:
        raise ValueError(f"task must be 'train' or 'eval', got {task!r}")
    if errors:
        raise ConfigError("config error: " + "; ".join(errors))
    for w in warnings:
        log.warning("config: %s", w)
    return warnings


def rules_for(task: str = "train") -> Iterable[str]:
    """Every key the schema checks (for docs and tests)."""
    if task == "eval":
        return list(EVAL_RULES)
    from cwdpo.run.stage_nodes import STAGE_OBJECTIVE, objective_keys

    keys = list(TRAIN_RULES)
    for name in STAGE_OBJECTIVE:
        keys += [f"stage.{name}.{k}" for k in {**STAGE_COMMON, **objective_keys(name)}]
    return keys
