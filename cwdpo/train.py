"""`python -m cwdpo.train [overrides]`: the whole two-stage pipeline (see conf/train.yaml)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cwdpo.config import CONFIG_DIR

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from cwdpo.pipeline import dump_config, run_pipeline

    dump_config(cfg, Path(cfg.paths.output_dir))
    results = run_pipeline(cfg)
    last = list(results["stages"].values())[-1]
    # Returned for Hydra sweepers (Optuna maximises the last stage's fact accuracy / CIDEr).
    return last.get("fact_accuracy", last.get("CIDEr"))


if __name__ == "__main__":
    main()
