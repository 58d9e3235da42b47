"""Local judges of a head-to-head comparison: per-image CIDEr-D, or any score function.

Why apart from the metric: a judge only turns two lists of outputs into per-item outcomes
(1 = A wins, 0.5 = tie, 0 = B wins); :class:`~cwdpo.metrics.winrate.WinRate` aggregates them
whichever judge decided. The LLM judge over HTTP is in :mod:`cwdpo.metrics.http_judge`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

from pycocoevalcap.cider.cider import Cider

from cwdpo.metrics.caption_tokenizer import tokenize_captions


class Judge(Protocol):
    """Anything that turns paired outputs into per-item outcomes (1 A wins, 0.5 tie, 0 B wins)."""

    def __call__(
        self, outputs_a: list[str], outputs_b: list[str], items: list[dict]
    ) -> list[float]: ...


def compare_scores(score_a: float, score_b: float, tol: float = 0.0) -> float:
    """1.0 if ``score_a`` beats ``score_b`` by more than ``tol``, 0.0 if the reverse, else 0.5."""
    if math.isnan(score_a) or math.isnan(score_b):
        raise ValueError(f"cannot compare NaN scores ({score_a}, {score_b})")
    if score_a - score_b > tol:
        return 1.0
    if score_b - score_a > tol:
        return 0.0
    return 0.5


def check_lengths(outputs_a: Sequence[str], outputs_b: Sequence[str], items: Sequence) -> None:
    """Every judge needs one output of A, one of B and one item per comparison."""
    if not len(outputs_a) == len(outputs_b) == len(items):
        raise ValueError(
            f"outputs_a ({len(outputs_a)}), outputs_b ({len(outputs_b)}) and items ({len(items)}) "
            "must have the same length"
        )


class ReferenceJudge:
    """Per-image CIDEr-D of each candidate against ``item["references"]``; higher wins.

    The CIDEr IDF is computed over the references of all items in the call (both candidates share
    it), using pycocoevalcap's ``Cider`` and the same tokenization as :class:`CaptionMetrics`
    (``tokenizer="auto"``: PTB with Java, else the Python fallback). ``tol`` is an absolute CIDEr
    margin (raw scale, 0..10) below which the pair is a tie; exactly equal scores always tie.
    """

    name = "reference"

    def __init__(self, tokenizer: str = "auto", tol: float = 0.0) -> None:
        self.tokenizer, self.tol = tokenizer, tol
        self.last_tokenizer: str | None = None

    def scores(
        self, outputs_a: list[str], outputs_b: list[str], items: list[dict]
    ) -> tuple[list[float], list[float]]:
        """Per-item CIDEr-D (raw scale) of A and of B."""
        check_lengths(outputs_a, outputs_b, items)
        refs = []
        for i, item in enumerate(items):
            r = item.get("references")
            r = [r] if isinstance(r, str) else list(r or [])
            if not r:
                raise ValueError(f"item {i} has no 'references'")
            refs.append(r)
        n = len(items)
        flat = list(outputs_a) + list(outputs_b) + [x for rs in refs for x in rs]
        tokens, self.last_tokenizer = tokenize_captions(flat, self.tokenizer)
        gts, pos = {}, 2 * n
        for i, rs in enumerate(refs):
            gts[i] = tokens[pos : pos + len(rs)]
            pos += len(rs)
        _, sa = Cider().compute_score(gts, {i: [tokens[i]] for i in range(n)})
        _, sb = Cider().compute_score(gts, {i: [tokens[n + i]] for i in range(n)})
        return [float(x) for x in sa], [float(x) for x in sb]

    def __call__(
        self, outputs_a: list[str], outputs_b: list[str], items: list[dict]
    ) -> list[float]:
        if not items:
            check_lengths(outputs_a, outputs_b, items)
            return []
        sa, sb = self.scores(outputs_a, outputs_b, items)
        return [compare_scores(a, b, self.tol) for a, b in zip(sa, sb)]


class ScoreJudge:
    """Generic judge: ``score_fn(caption, item) -> float`` for each side; higher wins.

    Scores whose difference is at most ``tol`` tie. ``name`` labels the judge in logs.
    """

    def __init__(
        self, score_fn: Callable[[str, dict], float], name: str = "score", tol: float = 0.0
    ) -> None:
        self.score_fn, self.name, self.tol = score_fn, name, tol

    def __call__(
        self, outputs_a: list[str], outputs_b: list[str], items: list[dict]
    ) -> list[float]:
        check_lengths(outputs_a, outputs_b, items)
        return [
            compare_scores(float(self.score_fn(a, it)), float(self.score_fn(b, it)), self.tol)
            for a, b, it in zip(outputs_a, outputs_b, items)
        ]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, tol={self.tol})"


class FactsJudge(ScoreJudge):
    """:class:`ScoreJudge` for a fact checker (e.g. ShapesWorld: fraction of true statements)."""

    def __init__(
        self, score_fn: Callable[[str, dict], float], name: str = "facts", tol: float = 0.0
    ) -> None:
        super().__init__(score_fn, name=name, tol=tol)
