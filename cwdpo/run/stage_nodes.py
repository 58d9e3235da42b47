"""The shape of a stage node (`stage.<name>` in conf/stage/pipeline.yaml), checked before any
model loads: the keys a stage takes, the classes its objective / module / datamodule nodes
name (imported, not built), the keys those take, and the objective's rules (its dataclass's).

`run.config_schema.validate_config` reports what these find with every other config error;
the pipeline checks the node again before it builds anything.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from cwdpo.losses.config import PreferenceConfig, SFTCConfig, objective_rules
from cwdpo.rules import Rule
from cwdpo.run.config_schema import ConfigError

#: The shape of a stage node (conf/stage/pipeline.yaml): the optimisation, the objective (a
#: dataclass of cwdpo.losses.config), the LightningModule and the LightningDataModule.
STAGE_KEYS = ("steps", "optimizer", "scheduler", "objective", "module", "datamodule")


def _target(name: str, part: str, node: Any) -> type:
    """The class `stage.<name>.<part>._target_` names (imported, not built)."""
    from hydra.utils import get_class

    target = node.get("_target_") if isinstance(node, dict) else None
    if not isinstance(target, str) or not target:
        raise ConfigError(f"stage.{name}.{part}._target_: expected a class path")
    try:
        return get_class(target)
    except Exception as e:  # a misspelt class path
        raise ConfigError(
            f"stage.{name}.{part}._target_={target!r}: {str(e).splitlines()[0]}"
        ) from None


def _init_keys(cls: type) -> set[str]:
    """Every keyword `cls(...)` takes: its `__init__`'s named parameters, and those of the base
    classes its `**kwargs` are handed to (a dataclass: its fields)."""
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls) if f.init}
    keys: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        keys |= {k for k, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return keys - {"self"}


def _unknown(where: str, given: Any, accepted: set[str]) -> None:
    unknown = sorted(set(given) - accepted - {"_target_", "_partial_", "_convert_"})
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {unknown}; accepted: {sorted(accepted)}")


def check_stage_node(name: str, cfg: DictConfig) -> dict[str, type]:
    """`stage.<name>` has the node shape (`STAGE_KEYS`), and its objective / module /
    datamodule nodes name importable classes and only keys those take. A typo, even one added
    with `+`, raises `ConfigError` naming the key and the accepted ones before any model loads
    (the classes are imported, not built). Returns {part: class}."""
    st = OmegaConf.to_container(cfg.stage[name], resolve=False)
    _unknown(f"stage.{name}", st, set(STAGE_KEYS))
    classes = {}
    for part in ("objective", "module", "datamodule"):
        cls = classes[part] = _target(name, part, st.get(part))
        _unknown(f"stage.{name}.{part}", st[part], _init_keys(cls))
    return classes


#: each stage's objective dataclass: the rules of `stage.<name>.objective.*` are its fields'
STAGE_OBJECTIVE = {"base_sft": SFTCConfig, "sft_c": SFTCConfig, "cw_dpo": PreferenceConfig}


def objective_keys(name: str, cls: type | None = None) -> dict[str, Rule]:
    """{`objective.<field>`: Rule} of stage `name` (of `cls`, the class its node names)."""
    rules = objective_rules(cls or STAGE_OBJECTIVE[name])
    return {f"objective.{k}": r for k, r in rules.items()}


def objective_error(name: str, cfg: DictConfig) -> str | None:
    """Build `stage.<name>.objective` (a small dataclass, no model): its `__post_init__` also
    checks what no single-key rule can (e.g. shuffle_weights needs cooling)."""
    from hydra.utils import instantiate

    try:
        instantiate(cfg.stage[name].objective)
    except Exception as e:  # Hydra wraps the dataclass's ValueError
        msg = str(e.__cause__ or e).splitlines()[0]
        return msg if msg.startswith(f"stage.{name}.") else f"stage.{name}.objective: {msg}"
    return None
