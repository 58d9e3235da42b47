"""`python -m cwdpo.train [overrides]`: the whole two-stage pipeline (see conf/train.yaml)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from cwdpo.config import CONFIG_DIR

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from cwdpo.config_schema import validate_config

    check_no_secrets(cfg)
    validate_config(cfg, "train")  # every value's type and range, before any model loads

    from cwdpo.pipeline import dump_config, run_pipeline
    from cwdpo.utils.checkpoint import resume_dir

    run_dir = resume_dir(cfg.get("resume"), cfg.paths.output_dir)
    if run_dir is not None:  # resume=<run dir>: everything (ckpts, results, CSV logs) goes there
        cfg.paths.output_dir = str(run_dir)
        warn_config_changes(cfg, run_dir)
    out = Path(cfg.paths.output_dir)
    if run_dir is None or not (out / "config.json").is_file():
        dump_config(cfg, out)  # a resume keeps the run's original config as the baseline
    results = run_pipeline(cfg)
    last = list(results["stages"].values())[-1]
    # Returned for Hydra sweepers (Optuna maximises the last stage's fact accuracy / CIDEr).
    return last.get("fact_accuracy", last.get("cider"))


def check_no_secrets(cfg: DictConfig) -> None:
    """API keys come from the environment only (e.g. `api_key_env: OPENAI_API_KEY`): a key
    in the config would be written, resolved, to config.yaml/json, the logs and W&B."""

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                key = f"{where}.{k}" if where else str(k)
                name = str(k).lower().replace("-", "_")
                secret = any(t in name for t in ("api_key", "apikey", "secret", "password")) or (
                    name == "token" or name.endswith(("access_token", "auth_token", "api_token",
                                                      "hf_token")))
                if secret and not name.endswith(("_env", "_var")) and isinstance(v, str) and v:
                    raise ValueError(
                        f"config key {key!r} holds a credential: API keys are read from the "
                        "environment only and never written to configs or logs; set the "
                        "environment variable and name it in the judge's `api_key_env` instead"
                    )
                walk(v, key)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    walk(OmegaConf.to_container(cfg, resolve=False), "")


def warn_config_changes(cfg: DictConfig, run_dir: Path) -> None:
    """Resuming with another config than the run was started with breaks reproducibility."""
    from cwdpo.utils.checkpoint import config_changes

    old_path = run_dir / "config.json"
    if not old_path.is_file():
        return
    new = json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True), default=str))
    changed = config_changes(json.loads(old_path.read_text()), new)
    if changed:
        log.warning("resume: the config differs from the one %s was started with, in: %s",
                    run_dir, ", ".join(changed))


if __name__ == "__main__":
    main()
