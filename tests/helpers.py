"""Compose the project's Hydra config in tests (no CLI, output dir under tmp)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from cwdpo.config import CONFIG_DIR


def compose_cfg(
    overrides: list[str], out_dir: Path, cache_dir: Path, name: str = "train"
) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            config_name=name,
            overrides=[f"paths.output_dir={out_dir}", f"paths.cache_dir={cache_dir}", *overrides],
        )
