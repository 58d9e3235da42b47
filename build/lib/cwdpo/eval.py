"""`python -m cwdpo.eval ckpt=<model dir> ...`: evaluate a checkpoint, write eval.json + eval.md."""

# A thin Hydra CLI: the evaluation is cwdpo.run.checkpoint_eval.run_eval.
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cwdpo.run.checkpoint_eval import run_eval
from cwdpo.run.config import CONFIG_DIR

__all__ = ["main", "run_eval"]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    from cwdpo.run.config_schema import validate_config

    validate_config(cfg, "eval")
    from cwdpo.utils.terminal import tidy_terminal

    tidy_terminal()
    run_eval(cfg)


if __name__ == "__main__":
    main()
