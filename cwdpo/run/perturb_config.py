"""`cwdpo.perturb`'s settings, checked before any file is read or request sent.

Why apart: the builder runs for hours against a paid or shared service; a typo'd kind, a prompt
without `{caption}`, a placeholder the code does not fill or a missing API key must fail in one
line naming the key (`ConfigError`, as `cwdpo.train`'s schema does), not at request 1 or 10,000.
"""

from __future__ import annotations

import os
from string import Formatter

from omegaconf import DictConfig, OmegaConf

from cwdpo.data.perturb_items import FORMATS
from cwdpo.rules import Rule, choice, integer, positive, real, string
from cwdpo.run.config_schema import ConfigError

RULES: dict[str, Rule] = {
    "input.format": choice(*FORMATS),
    "input.path": string(),
    "input.captions_per_image": integer(1),
    "perturb.url": string(),
    "perturb.model": string(),
    "perturb.api_key_env": string(nullable=True),
    "perturb.output": string(),
    "perturb.timeout": positive(),
    "perturb.max_retries": integer(0),
    "perturb.backoff": real(0),
    "perturb.concurrency": integer(1),
    "perturb.max_rows": integer(0, nullable=True),
    "perturb.max_consecutive_failures": integer(1, nullable=True),
    "perturb.attempts": integer(1),
    "perturb.max_edit_words": integer(1),
    "perturb.fallback": choice("rule", "drop"),
}
PLACEHOLDERS = {"caption", "kind", "kind_hint", "references", "max_edit_words", "prompt"}


def _fields(cfg: DictConfig) -> list[str]:
    errors = []
    for key, rule in RULES.items():
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
        except Exception:  # a ??? left unset
            errors.append(f"{key} is required (set {key}=...)")
            continue
        bad = rule.violated(value)
        if bad is not None:
            errors.append(f"{key}={value!r}: expected {bad}")
    return errors


def validate_perturb_config(cfg: DictConfig) -> None:
    """Every value `cwdpo.perturb` reads, before any file is read or request sent."""
    errors = _fields(cfg)
    p = cfg.perturb
    kinds = p.get("kinds")
    kinds = OmegaConf.to_container(kinds, resolve=True) if OmegaConf.is_config(kinds) else kinds
    if (
        not isinstance(kinds, dict)
        or not kinds
        or not all(isinstance(v, str) for v in kinds.values())
    ):
        errors.append("perturb.kinds: expected a non-empty mapping kind -> hint (a string)")
    for key in ("prompt", "system_prompt", "retry_prompt"):
        text = p.get(key)
        if not isinstance(text, str) or not text.strip():
            errors.append(f"perturb.{key}: expected a non-empty string")
            continue
        try:
            names = {f for _, f, _, _ in Formatter().parse(text) if f is not None}
        except ValueError as e:
            errors.append(
                f"perturb.{key}: not a format string ({e}); write literal braces as {{{{ }}}}"
            )
            continue
        allowed = PLACEHOLDERS | {"reason"} if key == "retry_prompt" else PLACEHOLDERS
        if names - allowed:
            errors.append(
                f"perturb.{key}: unknown placeholder(s) {sorted(names - allowed)}; use {sorted(allowed)}"
            )
        if key == "prompt" and "caption" not in names:
            errors.append("perturb.prompt: must contain {caption}")
    env = p.get("api_key_env")
    if not errors and env and not os.environ.get(env):
        errors.append(
            f"perturb.api_key_env: the environment variable {env} is not set; export it, or set "
            "perturb.api_key_env=null for a server without auth"
        )
    if errors:
        raise ConfigError("config error: " + "; ".join(errors))
