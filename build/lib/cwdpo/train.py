"""`python -m cwdpo.train [overrides]`: the whole two-stage pipeline (see conf/train.yaml)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from cwdpo.errors import DataError
from cwdpo.run.config import CONFIG_DIR
from cwdpo.run.preflight import (
    check_config_changes,
    check_no_secrets,
    check_resumable,
    record_config_changes,
)
from cwdpo.utils.overrides import plain_group_overrides

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def train(cfg: DictConfig) -> float | None:
    """The composed config → a finished run; returns its `optimized_metric` (for sweepers).
    The run dir's train.log ends with why it stopped; a stop signal exits 128 + its number."""
    from cwdpo.run.outcome import run_outcome
    from cwdpo.utils.signals import install_signal_handlers

    install_signal_handlers()  # SIGTERM / SIGUSR1 / Ctrl-C: checkpoint at the step, then stop
    with run_outcome(cfg):
        return _train(cfg)


def _train(cfg: DictConfig) -> float | None:
    from cwdpo.run.config_schema import validate_config

    check_no_secrets(cfg)
    validate_config(cfg, "train")  # every value's type and range, before any model loads

    from cwdpo.model.tiny import check_cache_dir
    from cwdpo.run.pipeline import dump_config, resolve_resume, run_pipeline
    from cwdpo.run.results import optimized_metric
    from cwdpo.utils.run_dir import hold_run_dir

    run_dir = resolve_resume(cfg)  # resume: everything (ckpts, results, CSV logs) goes there
    changes: dict = {}
    if run_dir is not None:
        check_resumable(run_dir, cfg)
        changes = check_config_changes(cfg, run_dir)  # refused unless resume_overrides=allow
    hold_run_dir(cfg.paths.output_dir)  # refuses a directory a live run is writing into
    check_cache_dir(cfg)
    out = Path(cfg.paths.output_dir)
    if changes:
        record_config_changes(out, cfg, changes)  # config_history/, then config.yaml is new
    elif run_dir is None or not (out / "config.json").is_file():
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


class InputError(CompactHydraException, DataError):
    """A `DataError` as the CLI shows it: its one line (the traceback with HYDRA_FULL_ERROR=1)."""


def cli() -> None:
    """The `cwdpo-train` console script: the two-stage pipeline, exit status 0 on success (a script's return
    value would be taken as the exit status)."""
    main()


if __name__ == "__main__":
    main()
