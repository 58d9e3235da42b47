"""Pairwise win rate of system A over system B with a bootstrap CI, plus judges that decide each pair.

Why: preference fine-tuning is judged by head-to-head comparisons (CW-DPO vs DPO captions on the
same images). :class:`WinRate` aggregates per-item outcomes (1 = A wins, 0.5 = tie, 0 = B wins;
ties count half) and reports a percentile-bootstrap confidence interval so small differences are
not over-read. Judges turn two lists of outputs into those outcomes:

* :class:`ReferenceJudge`: per-image CIDEr-D against the human references (no model needed).
* :class:`ScoreJudge` / :class:`FactsJudge`: any ``score_fn(caption, item) -> float`` (e.g. the
  ShapesWorld fact checker); higher wins.
* :class:`HttpJudge`: an LLM behind an OpenAI-compatible ``/chat/completions`` endpoint, with the
  A/B order randomized per item to cancel position bias. Standard library only.

The judges live in :mod:`cwdpo.metrics.judges` and :mod:`cwdpo.metrics.http_judge`; they are
re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from cwdpo.metrics.http_judge import HttpJudge, HttpJudgeError, parse_verdict
from cwdpo.metrics.judges import FactsJudge, Judge, ReferenceJudge, ScoreJudge, compare_scores

__all__ = [
    "FactsJudge",
    "HttpJudge",
    "HttpJudgeError",
    "Judge",
    "ReferenceJudge",
    "ScoreJudge",
    "WinRate",
    "bootstrap_win_rate_ci",
    "compare_scores",
    "parse_verdict",
]


def bootstrap_win_rate_ci(
    wins: int, ties: int, losses: int, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap CI of the win rate ``(wins + ties / 2) / n``.

    Resampling n items with replacement from data that takes only three values is the same as
    drawing the resampled (wins, ties, losses) counts from ``Multinomial(n, counts / n)``, so the
    bootstrap is exact, O(n_boot) memory, and deterministic for a given ``seed``
    (``numpy.random.default_rng(seed).multinomial``; quantiles with numpy's default linear rule).
    """
    n = wins + ties + losses
    if n <= 0:
        raise ValueError("bootstrap needs at least one outcome")
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.array([wins, ties, losses], dtype=np.float64) / n, size=n_boot)
    rates = (counts[:, 0] + 0.5 * counts[:, 1]) / n
    alpha = 1.0 - confidence
    low, high = np.quantile(rates, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


class WinRate(Metric):
    """Win rate of A over B (ties count half) with a percentile-bootstrap confidence interval.

    ``update(outcomes)`` takes per-item outcomes in {1.0 (A wins), 0.5 (tie), 0.0 (B wins)}.
    ``compute()`` returns ``win_rate`` (a fraction in [0, 1]), ``ci_low``/``ci_high`` (``confidence``
    level, ``n_boot`` resamples, deterministic given ``seed``), ``n``, ``wins``, ``ties``, ``losses``.
    State is three counters with sum reduction, so DDP sync is exact and tiny.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {n_boot}")
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        self.n_boot, self.seed, self.confidence = n_boot, seed, confidence
        for name in ("wins", "ties", "losses"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, outcomes: Tensor | Sequence[float]) -> None:
        """Add per-item outcomes (1.0 A wins, 0.5 tie, 0.0 B wins)."""
        out = torch.as_tensor(outcomes, dtype=torch.float64).flatten()
        valid = (out == 0.0) | (out == 0.5) | (out == 1.0)
        if not bool(valid.all()):
            bad = out[~valid][:5].tolist()
            raise ValueError(f"outcomes must be 1.0 (A wins), 0.5 (tie) or 0.0 (B wins); got {bad}")
        self.wins += int((out == 1.0).sum())
        self.ties += int((out == 0.5).sum())
        self.losses += int((out == 0.0).sum())

    def compute(self) -> dict[str, float]:
        """Point estimate, bootstrap CI and counts; raises if no outcomes were added."""
        wins, ties, losses = int(self.wins), int(self.ties), int(self.losses)
        n = wins + ties + losses
        if n == 0:
            raise ValueError("WinRate.compute() has no data: call update(outcomes) first")
        low, high = bootstrap_win_rate_ci(
            wins, ties, losses, self.n_boot, self.seed, self.confidence
        )
        return {
            "win_rate": (wins + 0.5 * ties) / n,
            "ci_low": low,
            "ci_high": high,
            "n": n,
            "wins": wins,
            "ties": ties,
            "losses": losses,
        }
