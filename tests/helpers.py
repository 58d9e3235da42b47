"""Compose the project's Hydra config in tests (no CLI, output dir under tmp)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from cwdpo.run.config import CONFIG_DIR, plain_group_overrides


def compose_cfg(
    overrides: list[str], out_dir: Path, cache_dir: Path, name: str = "train"
) -> DictConfig:
    """The config `python -m cwdpo.<name> *overrides` composes (`+experiment=NAME` accepted,
    as the CLI accepts it)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            config_name=name,
            overrides=[
                f"paths.output_dir={out_dir}",
                f"paths.cache_dir={cache_dir}",
                *plain_group_overrides(overrides),
            ],
        )


def bare_cw_dpo_module(pair_logps, **knobs):
    """A `CWDPOModule` without a backbone (no `__init__`): the loss knobs set directly
    (defaults: CW-DPO at β=0.1) and `pair_logps` replaced by `pair_logps(batch)`, so
    `compute` runs on literal log-prob tensors."""
    import torch

    from cwdpo.stages import CWDPOModule

    m = CWDPOModule.__new__(CWDPOModule)
    torch.nn.Module.__init__(m)
    defaults = dict(
        beta=0.1,
        cooling=True,
        floor=-2.0,
        tau=0.5,
        filter_threshold=None,
        loss_type="sigmoid",
        rpo_alpha=0.0,
        loser_weight=None,
        shuffle_weights=False,
    )
    for k, v in {**defaults, **knobs}.items():
        setattr(m, k, v)
    m.pair_logps = pair_logps
    return m
