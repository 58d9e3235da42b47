"""Hydra/OmegaConf glue: resolvers and the config directory (the `+group=` spelling of
overrides: cwdpo.utils.overrides)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

#: The configs ship inside the package (package data), so a wheel install runs the main job;
#: a checkout's top-level `conf/` is a link to this directory.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _tiny_vlm(cache_dir: str) -> str:
    from cwdpo.model.tiny import ensure_tiny_vlm

    return str(ensure_tiny_vlm(cache_dir))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("tiny_vlm"):
        OmegaConf.register_new_resolver("tiny_vlm", _tiny_vlm)


register_resolvers()
