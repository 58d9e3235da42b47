"""The probe callback's settings: one validated dataclass (`conf/callbacks/default.yaml`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

GROUPS = ("positives", "gentle", "easy", "on_policy")


@dataclass
class ProbeConfig:
    """What is probed, how often, at what cost (rules are passed to the callback apart).

    every_n_steps:  probe interval in optimizer steps (doubled when `max_cost_frac` is exceeded).
    n_items, batch_size, split, fallback_split, seed: the probe records (first `n_items` of
                    `split`, else of `fallback_split`), texts drawn with a (seed, group) RNG,
                    scored `batch_size` texts per no-grad forward.
    groups:         dataset groups (positives / gentle / easy); "on_policy" listed here turns
                    the on-policy group on.
    on_policy:      True | False | "auto" (when the stage trains on on-policy negatives):
                    one sample per probe image from the stage-start policy, then frozen.
    quantiles:      Δℓ̄ quantile columns; dist_topk: TV/JS support (top-k + a rest bucket).
    max_cost_frac:  share of the stage's wall time the recurring probes may take (None: no bound).
    n_samples, sample_max_new_tokens: greedy captions of probe images at each stage end.
    """

    every_n_steps: int = 20
    n_items: int = 64
    batch_size: int = 32
    split: str = "probe"
    fallback_split: str = "val"
    seed: int = 0
    groups: Sequence[str] = ("positives", "gentle", "easy")
    on_policy: bool | str = "auto"
    on_policy_temperature: float = 1.0
    on_policy_max_new_tokens: int = 32
    quantiles: Sequence[float] = (0.1, 0.5, 0.9)
    dist_topk: int | None = 512
    max_cost_frac: float | None = 0.25
    n_samples: int = 8
    sample_max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if self.every_n_steps < 1:
            raise ValueError(f"probes.every_n_steps must be >= 1, got {self.every_n_steps}")
        unknown = [g for g in self.groups if g not in GROUPS]
        if unknown:
            raise ValueError(f"unknown probe group(s) {unknown}; choose from {list(GROUPS)}")
        self.every_n_steps = int(self.every_n_steps)
        self.n_items, self.batch_size, self.seed = (
            int(self.n_items),
            int(self.batch_size),
            int(self.seed),
        )
        op = self.on_policy if isinstance(self.on_policy, str) else bool(self.on_policy)
        self.on_policy = True if "on_policy" in self.groups and op is False else op
        self.groups = [g for g in self.groups if g != "on_policy"]
        self.quantiles = [float(q) for q in self.quantiles]
        self.n_samples, self.sample_max_new_tokens = (
            int(self.n_samples),
            int(self.sample_max_new_tokens),
        )

    def wants_on_policy(self, datamodule: object) -> bool:
        """Probe an on-policy group in this stage?"""
        return self.on_policy is True or (
            self.on_policy == "auto" and bool(getattr(datamodule, "needs_on_policy", False))
        )
