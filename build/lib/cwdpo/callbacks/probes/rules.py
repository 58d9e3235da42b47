"""Probe rules (pure): a condition on one probe statistic's trajectory, and what it triggers.

Testable on a constructed trajectory: `rule_fires` says whether a rule's condition holds at
the last probe, `rule_due` whether it acts now (once for "stop", on a cooldown for "refresh",
when the condition starts to hold for "log"). The callback only feeds them its trajectory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class ProbeRule:
    """A condition on one probe statistic's trajectory, and what to do when it holds.

    kind:     "drop_from_best" — best-so-far minus current > threshold (likelihood displacement
              of positives); "below" — current < threshold (squeezing: negatives collapsing);
              "above" — current > threshold.
    group:    probe group (positives / gentle / easy / on_policy).
    stat:     mean | q10 | q50 | q90 | … (Δℓ̄ columns), sum_mean, ell (absolute ℓ̄), entropy,
              top1, tv, js.
    baseline: "stage" (Δ from this stage's start) or "run" (from the run's first stage start).
    patience: the condition must hold at this many consecutive probes.
    min_step: probes before this stage-local step are ignored (warm-up).
    stages:   stage names the rule applies to (None: all).
    action:   "stop" (end this stage; the pipeline moves on), "refresh" (resample on-policy
              negatives), "log" (record only).
    cooldown: steps before a "refresh"/"log" rule may fire again.
    """

    name: str
    kind: str
    group: str = "positives"
    stat: str = "mean"
    threshold: float = 0.0
    baseline: str = "stage"
    patience: int = 1
    min_step: int = 0
    stages: Sequence[str] | None = None
    action: str = "stop"
    cooldown: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("drop_from_best", "below", "above"):
            raise ValueError(f"probe rule {self.name!r}: kind must be drop_from_best|below|above")
        if self.action not in ("stop", "refresh", "log"):
            raise ValueError(f"probe rule {self.name!r}: action must be stop|refresh|log")
        if self.baseline not in ("stage", "run"):
            raise ValueError(f"probe rule {self.name!r}: baseline must be stage|run")
        if self.patience < 1:
            raise ValueError(f"probe rule {self.name!r}: patience must be >= 1")

    @property
    def column(self) -> str:
        """The probes.csv column the rule reads."""
        relative = self.stat in ("mean", "sum_mean") or re.fullmatch(r"q[\d.]+", self.stat)
        return f"run_{self.stat}" if self.baseline == "run" and relative else self.stat

    def applies_to(self, stage: str) -> bool:
        return self.stages is None or stage in self.stages


def _holds(kind: str, threshold: float, values: Sequence[float], i: int) -> bool:
    v = values[i]
    if not math.isfinite(v):
        return False
    if kind == "below":
        return v < threshold
    if kind == "above":
        return v > threshold
    best = max((x for x in values[: i + 1] if math.isfinite(x)), default=v)
    return best - v > threshold


def rule_fires(rule: ProbeRule, steps: Sequence[int], values: Sequence[float]) -> bool:
    """Does `rule` hold at the last probe of this trajectory (with patience and warm-up)?

    `steps`/`values`: the stage-local steps and the rule's statistic at every probe so far.
    "drop_from_best" compares with the best value since the stage start (warm-up included,
    since the best is what displacement is measured from).
    """
    if len(values) < rule.patience:
        return False
    idx = range(len(values) - rule.patience, len(values))
    return all(
        steps[i] >= rule.min_step and _holds(rule.kind, rule.threshold, values, i) for i in idx
    )


def rule_due(
    rule: ProbeRule, holds: bool, was_holding: bool, last_fired: int | None, step: int
) -> bool:
    """Does a rule whose condition `holds` act at `step`? "stop" fires once; "refresh" whenever
    its condition holds (at most once per `cooldown` steps); "log" when it starts to hold."""
    if not holds or (rule.action == "stop" and last_fired is not None):
        return False
    if rule.action == "log" and was_holding:
        return False
    return last_fired is None or step - last_fired >= max(rule.cooldown, 1)


def describe_firing(rule: ProbeRule, steps: Sequence[int], values: Sequence[float]) -> str:
    """Human-readable reason, saved in results.json and stages.json."""
    v = values[-1]
    if rule.kind == "drop_from_best":
        best = max(x for x in values if math.isfinite(x))
        what = f"{rule.group} {rule.column} fell {best - v:.3f} from its best {best:.3f} (> {rule.threshold})"
    else:
        rel = "<" if rule.kind == "below" else ">"
        what = f"{rule.group} {rule.column} = {v:.3f} {rel} {rule.threshold}"
    return f"{rule.name}: {what} at step {steps[-1]}"


def parse_rules(rules: Mapping[str, Any] | Sequence[Any] | None) -> list[ProbeRule]:
    """Rules from config: a mapping name → fields (null entries are disabled) or a list."""
    if not rules:
        return []
    out = []
    items = rules.items() if isinstance(rules, Mapping) else ((r.get("name"), r) for r in rules)
    for name, spec in items:
        if spec is None or (isinstance(spec, Mapping) and spec.get("enabled", True) is False):
            continue
        if isinstance(spec, ProbeRule):
            out.append(spec)
            continue
        spec = {k: v for k, v in dict(spec).items() if k != "enabled"}
        spec.setdefault("name", name)
        if spec.get("stages") is not None:
            spec["stages"] = list(spec["stages"])
        out.append(ProbeRule(**spec))
    return out
