"""One dataclass per objective: the loss knobs, their rules, validated once when built.

Why: the knobs used to live in five places (module arguments, module attributes, a config
rebuilt every step, checks inside the loss functions, a hand-kept schema that disagreed with
them). Now `stage.<name>.objective` is a Hydra node whose `_target_` is one of these classes
(as open-instruct's `DPOConfig`); `__post_init__` checks every field against the `Rule` in its
metadata, `run.config_schema` reads the same rules (`objective_rules`) to fail before a model
loads, and the loss functions take the built object without checking it again.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any, ClassVar

import torch

from cwdpo.rules import (
    Rule,
    about,
    boolean,
    choice,
    either,
    positive,
    real,
)


class LossType(str, Enum):
    """`stage.cw_dpo.objective.loss_type`: the objective stage 2 trains on."""

    SIGMOID = "sigmoid"  # (CW-)DPO on sequence log-ratios
    IPO = "ipo"  # IPO's squared loss on per-token average log-ratios (as TRL)
    SFT = "sft"  # NLL of the chosen only (RFT / SFT-continuation baselines)


def knob(default: Any, rule: Rule) -> Any:
    """A dataclass field whose allowed values are `rule` (read by `check` and the schema)."""
    return dataclasses.field(default=default, metadata={"rule": rule})


def objective_rules(cls: type) -> dict[str, Rule]:
    """{field: Rule} of an objective dataclass: what `run.config_schema` checks."""
    return {f.name: f.metadata["rule"] for f in dataclasses.fields(cls) if "rule" in f.metadata}


def check(obj: Any, where: str) -> None:
    """Raise ValueError naming `<where>.<field>`, the value and the allowed values."""
    errors = []
    for name, rule in objective_rules(type(obj)).items():
        v = getattr(obj, name)
        v = v.value if isinstance(v, Enum) else v
        bad = rule.violated(v)
        if bad is not None:
            errors.append(f"{where}.{name}={v!r}: expected {bad}")
    if errors:
        raise ValueError("; ".join(errors))


@dataclasses.dataclass(frozen=True)
class SFTCConfig:
    """SFT-C (and base SFT): L = E[NLL_ε(y⁺)] + λ·ReLU(C − E[NLL(y⁻)]); see `sft_c_loss`."""

    where: ClassVar[str] = "stage.sft_c.objective"

    lam: float = knob(0.0, about(real(0), "λ, weight of the negatives' hinge; 0 = plain SFT"))
    margin_c: float = knob(1.0, about(real(0), "C, the NLL bound of the negatives"))
    reduction: str = knob("mean", choice("mean", "sum"))
    label_smoothing: float = knob(0.0, about(real(0, 1, hi_open=True), "ε on the positive term"))
    constraint: str = knob("soft", choice("soft", "hard"))

    def __post_init__(self) -> None:
        check(self, self.where)


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """Stage 2's objective (`stage.cw_dpo.objective`): CW-DPO, and by its knobs vanilla DPO
    (cooling=false), IPO, RPO and the baselines; see `cw_dpo_loss` / `preference_loss`."""

    where: ClassVar[str] = "stage.cw_dpo.objective"

    loss_type: LossType | str = knob(LossType.SIGMOID, choice("sigmoid", "ipo", "sft"))
    beta: float = knob(0.1, about(positive(), "β, the DPO inverse temperature"))
    cooling: bool = knob(True, boolean())
    #: ℓ_floor (see `resolve_floor`): a number, "mean", or a tensor a caller computed
    floor: float | str | torch.Tensor = knob(-2.0, about(either(real(), choice("mean")), "ℓ_floor"))
    tau: float = knob(0.5, about(positive(), "τ, the cooling temperature"))
    #: ℓ̄ is a mean log-prob, so a threshold above 0 would drop every pair
    filter_threshold: float | None = knob(None, real(hi=0, nullable=True))
    #: RPO: + α · token-mean NLL of the chosen, on any loss type
    rpo_alpha: float = knob(0.0, real(0))
    #: baseline: w_c ≡ loser_weight. It stands in for w_c = σ(·) ∈ (0, 1) (1 = vanilla DPO,
    #: 0 = chosen only, the mean w_c of a CW-DPO run = matched DPO), so [0, 1]
    loser_weight: float | None = knob(
        None, about(real(0, 1, nullable=True), "constant w_c (0 = chosen only)")
    )
    shuffle_weights: bool = knob(False, boolean())  # baseline: w_c permuted within the batch

    def __post_init__(self) -> None:
        if isinstance(self.floor, torch.Tensor):  # a computed ℓ_floor: no rule to check
            check(dataclasses.replace(self, floor=0.0), self.where)
        else:
            check(self, self.where)
        object.__setattr__(self, "loss_type", LossType(self.loss_type))
        if self.shuffle_weights and (not self.cooling or self.loser_weight is not None):
            raise ValueError(
                f"{self.where}.shuffle_weights needs cooling=true and loser_weight=null "
                f"(got cooling={self.cooling}, loser_weight={self.loser_weight})"
            )
