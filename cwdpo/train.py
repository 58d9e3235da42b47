"""`python -m cwdpo.train [overrides]`: the whole two-stage pipeline (see conf/train.yaml)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from cwdpo.errors import DataError
from cwdpo.run.config import CONFIG_DIR, plain_group_overrides
from cwdpo.run.config_schema import ConfigError

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def train(cfg: DictConfig) -> float | None:
    """The composed config → a finished run; returns its `optimized_metric` (for sweepers)."""
    from cwdpo.run.config_schema import validate_config

    check_no_secrets(cfg)
    validate_config(cfg, "train")  # every value's type and range, before any model loads

    from cwdpo.run.pipeline import dump_config, resolve_resume, run_pipeline
    from cwdpo.utils.run_dir import check_cache_dir, hold_run_dir

    run_dir = resolve_resume(cfg)  # resume: everything (ckpts, results, CSV logs) goes there
    if run_dir is not None:
        check_resumable(run_dir, cfg)
        warn_config_changes(cfg, run_dir)
    hold_run_dir(cfg.paths.output_dir)  # refuses a directory a live run is writing into
    check_cache_dir(cfg)
    out = Path(cfg.paths.output_dir)
    if run_dir is None or not (out / "config.json").is_file():
        dump_config(cfg, out)  # a resume keeps the run's original config as the baseline
    from cwdpo.utils.terminal import tidy_terminal

    tidy_terminal()
    log.info("run directory: %s", out)
    try:
        results = run_pipeline(cfg, run_dir)
    except DataError as e:  # it names file, row and field: print that line, not a traceback
        raise InputError(str(e)) from e
    print(f"run directory: {out}")
    return optimized_metric(results, cfg.get("optimized_metric"))


def main() -> float | None:
    """`python -m cwdpo.train [overrides]`; `+experiment=NAME` (the documented spelling) and
    `experiment=NAME` alike, also for `debug` and `hparams_search` (cwdpo/run/config.py)."""
    sys.argv[1:] = plain_group_overrides(sys.argv[1:])
    return train()


def optimized_metric(results: dict[str, Any], name: str | None) -> float | None:
    """The last stage's metric `name` (`optimized_metric`, set by conf/hparams_search/*): what
    a Hydra sweeper maximises. None when `name` is null (a plain run)."""
    if not name:
        return None
    stage, last = list(results["stages"].items())[-1]
    if name not in last:
        available = sorted(
            k for k, v in last.items() if isinstance(v, int | float) and not isinstance(v, bool)
        )
        raise ConfigError(
            f"optimized_metric={name!r}: the last stage ({stage}) has no such metric; "
            f"available: {available}"
        )
    return last[name]


class InputError(CompactHydraException, DataError):
    """A `DataError` as the CLI shows it: its one line (the traceback with HYDRA_FULL_ERROR=1)."""


def check_no_secrets(cfg: DictConfig) -> None:
    """API keys come from the environment only (e.g. `api_key_env: OPENAI_API_KEY`): a key
    in the config would be written, resolved, to config.yaml/json, the logs and W&B."""

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                key = f"{where}.{k}" if where else str(k)
                name = str(k).lower().replace("-", "_")
                secret = any(t in name for t in ("api_key", "apikey", "secret", "password")) or (
                    name == "token"
                    or name.endswith(("access_token", "auth_token", "api_token", "hf_token"))
                )
                if secret and not name.endswith(("_env", "_var")) and isinstance(v, str) and v:
                    raise ConfigError(
                        f"config key {key!r} holds a credential: API keys are read from the "
                        "environment only and never written to configs or logs; set the "
                        "environment variable and name it in the judge's `api_key_env` instead"
                    )
                walk(v, key)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    walk(OmegaConf.to_container(cfg, resolve=False), "")


def check_resumable(run_dir: Path, cfg: DictConfig) -> None:
    """`resume` must point at an earlier run: `resume=true` in a fresh timestamped dir used to
    start a new run silently, elsewhere than the one the user meant to continue."""
    from cwdpo.utils.run_dir import RunDirError

    if (run_dir / "config.json").is_file():
        return
    how = (
        "resume=true resumes the run in hydra.run.dir, which was not given (this is a fresh "
        "directory)"
        if str(cfg.get("resume")).lower() == "true"
        else f"resume={cfg.resume}"
    )
    runs = sorted(
        Path(str(cfg.paths.log_dir)).glob("train/runs/*/*/config.json"),
        key=lambda p: p.stat().st_mtime,
    )
    hint = f"; the latest run is resume={runs[-1].parent}" if runs else ""
    raise RunDirError(
        f"{how}: {run_dir} holds no earlier run (no config.json); pass resume=<run dir>{hint}"
    )


def warn_config_changes(cfg: DictConfig, run_dir: Path) -> None:
    """Resuming with another config than the run was started with breaks reproducibility."""
    from cwdpo.utils.checkpoint import config_changes

    old_path = run_dir / "config.json"
    if not old_path.is_file():
        return
    new = json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True), default=str))
    changed = config_changes(json.loads(old_path.read_text()), new)
    if changed:
        log.warning(
            "resume: the config differs from the one %s was started with, in: %s",
            run_dir,
            ", ".join(changed),
        )


if __name__ == "__main__":
    main()
