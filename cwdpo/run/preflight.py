"""Checks a training run passes before anything loads: no credentials in the config, a `resume`
that points at an earlier run, and no silently changed training value on resume (refused unless
`resume_overrides=allow`, then recorded in `config_history/` and results.json)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
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


RUN_IDENTITY = ("resume", "resume_overrides", "paths", "hydra")  # where a run is, not what


def _plain(cfg: DictConfig) -> dict[str, Any]:
    return json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True), default=str))


def _path_only(a: Any, b: Any, moves: list[tuple[str, str]]) -> bool:
    """`a` becomes `b` when the old run's `paths.*` values are replaced by the new ones (e.g.
    `model.path` under another `paths.cache_dir`): a path difference, not a training change."""
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    for old, new in moves:
        a = a.replace(old, new)
    return a == b


def check_config_changes(cfg: DictConfig, run_dir: Path) -> dict[str, list[Any]]:
    """{dotted key: [value the run was started with, value now]} for a resume, before any model
    loads; refused (one line listing each change) unless `resume_overrides=allow`, since half a
    stage at one value and half at another, silently, is no experiment. Run identity (`paths.*`,
    `resume`, output dirs, values that differ only by those paths) is not a change."""
    old_path = run_dir / "config.json"
    if not old_path.is_file():
        return {}
    old, new = json.loads(old_path.read_text()), _plain(cfg)
    old_paths, new_paths = old.get("paths") or {}, new.get("paths") or {}
    moves = sorted(
        ((str(v), str(new_paths[k])) for k, v in old_paths.items() if k in new_paths and v),
        key=lambda m: -len(m[0]),
    )

    def value(d: dict[str, Any], key: str) -> Any:
        for part in key.split("."):
            d = d.get(part, "<missing>") if isinstance(d, dict) else "<missing>"
        return d

    changes = {
        k: [value(old, k), value(new, k)]
        for k in config_changes(old, new, ignore=RUN_IDENTITY)
        if not _path_only(value(old, k), value(new, k), moves) and not _follows(cfg, k)
    }
    if changes and str(cfg.get("resume_overrides") or "refuse") != "allow":
        shown = "; ".join(f"{k}: {_show(a)} → {_show(b)}" for k, (a, b) in changes.items())
        raise ConfigError(
            f"resume={run_dir}: the config differs from the one this run was started with: "
            f"{shown}. Resume with the run's values (its config.yaml), or add "
            "resume_overrides=allow to continue with the new ones (recorded in "
            "config_history/ and results.json)"
        )
    if changes:
        log.warning(
            "resume: continuing %s with changed values (resume_overrides=allow): %s",
            run_dir,
            "; ".join(f"{k}: {_show(a)} → {_show(b)}" for k, (a, b) in changes.items()),
        )
    return changes


def _follows(cfg: DictConfig, key: str) -> bool:
    """Whether `key` (or a node above it) is an interpolation in `cfg`: it follows another key
    (`stage.cw_dpo.module.objective: ${..objective}`), whose change is reported there."""
    from omegaconf import OmegaConf

    node: Any = cfg
    for part in key.split("."):
        if not OmegaConf.is_dict(node) or part not in node:
            return False
        if OmegaConf.is_interpolation(node, part):
            return True
        node = node._get_node(part)
    return False


def config_changes(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    prefix: str = "",
    ignore: tuple[str, ...] = ("resume",),
) -> list[str]:
    """Dotted keys whose values differ between two plain config dicts (`check_config_changes`'s
    diff; `ignore`: dotted keys left out, with everything under them)."""
    out: list[str] = []
    for k in sorted(set(old) | set(new), key=str):
        key = f"{prefix}{k}"
        if key in ignore:
            continue
        a, b = old.get(k, "<missing>"), new.get(k, "<missing>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_changes(a, b, key + ".", ignore)
        elif a != b:
            out.append(key)
    return out


def _show(v: Any) -> str:
    return json.dumps(v) if isinstance(v, str | list | dict) else str(v)


def record_config_changes(run_dir: Path, cfg: DictConfig, changes: dict[str, list[Any]]) -> None:
    """An allowed change: the config the run had is kept as `config_history/attempt_<n>.yaml`
    (n: the last attempt that trained with it), this attempt's changes as
    `config_history/attempt_<n+1>.changes.json` (results.json gathers them), and config.yaml /
    config.json say what the run trains with from now on."""
    from cwdpo.run.attempts import ATTEMPTS
    from cwdpo.run.pipeline import dump_config
    from cwdpo.utils.io import atomic_write_json, atomic_write_text

    try:
        n = len(json.loads((run_dir / ATTEMPTS).read_text()))
    except (OSError, ValueError):
        n = 1
    hist = run_dir / "config_history"
    hist.mkdir(exist_ok=True)
    old_yaml = run_dir / "config.yaml"
    if old_yaml.is_file() and not (hist / f"attempt_{n}.yaml").exists():
        atomic_write_text(hist / f"attempt_{n}.yaml", old_yaml.read_text())
    atomic_write_json(
        hist / f"attempt_{n + 1}.changes.json", {"attempt": n + 1, "changes": changes}
    )
    dump_config(cfg, run_dir)
