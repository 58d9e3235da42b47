"""Multiple-choice accuracy (MMBench / MMMU), overall and per category, DDP-safe."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from cwdpo.metrics.string_codec import decode_strings, encode_strings


class MultipleChoiceAccuracy(Metric):
    """Accuracy of predicted option letters; `group` ids enable circular evaluation.

    Circular evaluation (MMBench): a question counts as correct only if every rotation of its
    options (same `group`) is answered correctly. Strings are kept as encoded tensor states so
    ranks gather them (categories are not known in advance).
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=[], dist_reduce_fx="cat")
        self.add_state("categories", default=[], dist_reduce_fx="cat")
        self.add_state("groups", default=[], dist_reduce_fx="cat")

    def update(
        self,
        predictions: Sequence[str],
        answers: Sequence[str],
        categories: Sequence[str] | None = None,
        groups: Sequence[str] | None = None,
    ) -> None:
        if len(predictions) != len(answers):
            raise ValueError("predictions and answers must have the same length")
        n = len(predictions)
        self.correct.append(
            torch.tensor([p == a for p, a in zip(predictions, answers)], dtype=torch.float32)
        )
        self.categories.append(encode_strings(list(categories or [""] * n)))
        self.groups.append(
            encode_strings(list(groups) if groups is not None else [str(i) for i in range(n)])
        )

    def compute(self) -> dict[str, float]:
        def flat(state: Any) -> torch.Tensor:
            return torch.cat(state) if isinstance(state, list) else state

        if not self.correct:
            raise RuntimeError("MultipleChoiceAccuracy.compute() called before any update()")
        correct = flat(self.correct).tolist()
        cats = [
            s
            for t in (self.categories if isinstance(self.categories, list) else [self.categories])
            for s in decode_strings(t)
        ]
        groups = [
            s
            for t in (self.groups if isinstance(self.groups, list) else [self.groups])
            for s in decode_strings(t)
        ]
        by_group: dict[str, list[float]] = defaultdict(list)
        group_cat: dict[str, str] = {}
        for c, cat, g in zip(correct, cats, groups):
            by_group[g].append(c)
            group_cat[g] = cat
        per_q = {g: float(all(v)) for g, v in by_group.items()}
        out = {"accuracy": 100.0 * sum(per_q.values()) / len(per_q), "n": float(len(per_q))}
        per_cat: dict[str, list[float]] = defaultdict(list)
        for g, v in per_q.items():
            per_cat[group_cat[g]].append(v)
        for cat, vals in sorted(per_cat.items()):
            if cat:
                out[f"accuracy/{cat}"] = 100.0 * sum(vals) / len(vals)
        return out
