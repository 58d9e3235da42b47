"""`negatives=dataset|on_policy|mixed|self_judged`: the config group's settings, checked, and
the counts a stage keeps of what its negatives were and cost (`NegativeStats`).

The choice settings (kind, fractions, `min_gap`, `easy_mix`) are read by
`cwdpo.data.datamodules.PreferenceDataModule`; the sampling settings (`num_samples`,
`temperature`, `top_p`, `max_new_tokens`, `generation_batch_size`, `refresh_every_n_steps`) by
the on-policy callback, `cwdpo.callbacks.on_policy`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class NegativeConfig:
    """`negatives=dataset|on_policy|mixed` — one knob, `dataset_fraction`, blends them.

    `self_judged`: the pair itself comes from the policy — K = `num_samples` samples per image,
    scored by the source's judge (ShapesWorld: the verifier against the truth); chosen = best,
    rejected = worst when their score gap is ≥ `min_gap`, else the best and a one-fact edit of
    it. `easy_mix` swaps that many rejected texts for trivially wrong ones (tests cooling).
    """

    kind: str = "dataset"
    dataset_fraction: float = 1.0
    easy_fraction: float = 0.5  # among dataset negatives: easy vs hard/gentle
    num_samples: int = 2
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    refresh_every_n_steps: int = 50
    generation_batch_size: int = 32
    min_gap: float = 0.1  # self_judged: least judge-score gap between best and worst sample
    easy_mix: float = 0.0  # self_judged: share of rejected swapped for an easy negative
    # self_judged: `best_worst`, or `companion_edit` — on the testbed's trigger images the best
    # candidate and a one-phrase companion edit of it (cwdpo.data.companion_pairs)
    pair_rule: str = "best_worst"
    greedy_candidate: bool = False  # self_judged: the greedy caption joins the K samples

    def __post_init__(self) -> None:
        if not 0.0 <= self.dataset_fraction <= 1.0:
            raise ValueError(
                f"negatives.dataset_fraction must be in [0, 1], got {self.dataset_fraction}"
            )
        if not 0.0 <= self.easy_fraction <= 1.0:
            raise ValueError(f"negatives.easy_fraction must be in [0, 1], got {self.easy_fraction}")
        if not 0.0 <= self.easy_mix <= 1.0:
            raise ValueError(f"negatives.easy_mix must be in [0, 1], got {self.easy_mix}")
        if self.kind not in ("dataset", "on_policy", "mixed", "self_judged"):
            raise ValueError(
                f"negatives.kind must be dataset|on_policy|mixed|self_judged, got {self.kind!r}"
            )
        if self.easy_mix > 0 and self.kind != "self_judged":
            raise ValueError(
                f"negatives.easy_mix={self.easy_mix} only applies to negatives=self_judged "
                "(dataset negatives use negatives.easy_fraction)"
            )
        if self.pair_rule not in ("best_worst", "companion_edit"):
            raise ValueError(
                f"negatives.pair_rule must be best_worst|companion_edit, got {self.pair_rule!r}"
            )
        if (self.pair_rule != "best_worst" or self.greedy_candidate) and self.kind != "self_judged":
            raise ValueError(
                f"negatives.pair_rule={self.pair_rule} / greedy_candidate="
                f"{self.greedy_candidate} only apply to negatives=self_judged (got {self.kind})"
            )
        if self.kind == "self_judged" and self.num_samples < 2:
            raise ValueError(
                f"negatives.num_samples must be >= 2 for self_judged pairs, got {self.num_samples}"
            )
        fixed = {"dataset": 1.0, "on_policy": 0.0, "self_judged": 0.0}.get(self.kind)
        if fixed is not None and self.dataset_fraction != fixed:
            raise ValueError(
                f"negatives.dataset_fraction={self.dataset_fraction} only applies to "
                f"negatives=mixed (negatives={self.kind} means {fixed})"
            )


@dataclass
class NegativeStats:
    """Where a preference stage's negatives came from and what on-policy sampling cost; kept
    in the data module's checkpoint state, so a resumed stage counts on."""

    counts: Counter = field(default_factory=Counter)  # negatives used, by source
    refresh_steps: list[int] = field(default_factory=list)
    rejected_as_positive: int = 0
    on_policy_fallback: int = 0
    sampled_records: int = 0  # records this rank sampled, over all refreshes
    samples: int = 0  # captions this rank generated (sampled_records × K)
    pairs: int = 0  # pairs this rank trained on
    sample_seconds: float = 0.0

    def samples_per_pair(self) -> float:
        """Captions generated per pair trained: K when a refresh samples just what the next
        steps train on, dataset size × K / pairs when it samples everything."""
        return self.samples / self.pairs if self.pairs else 0.0

    def to_state(self) -> dict[str, Any]:
        return {**asdict(self), "counts": dict(self.counts)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> NegativeStats:
        """From `to_state()` (checkpoints written before a field existed keep its default)."""
        known = {k: v for k, v in state.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "counts": Counter(known.get("counts", {}))})
