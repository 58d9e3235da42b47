"""Checks a training run passes before anything loads: no credentials in the config, a `resume`
that points at an earlier run, and a warning when a resume changes the config."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cwdpo.run.config_schema import ConfigError

log = logging.getLogger(__name__)


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
