"""Logging and diagnostics never stop training: a failure is one warning and a count.

A W&B histogram, a sample table, a CSV row or a plot is worth much less than the run that
produces it. Every such write goes through `FAILURES.guard(what)` (or a logger wrapped by
`guard_logger`): an exception becomes one warning naming `what` and the error (repeats of the
same failure are counted, not re-logged), the count lands in results.json, and training goes on.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

# Logger methods that write something; each is wrapped by `guard_logger`.
LOGGER_METHODS = (
    "log_metrics",
    "log_hyperparams",
    "log_graph",
    "save",
    "finalize",
    "after_save_checkpoint",
)


class LogFailures:
    """Counts of failed logging/diagnostic writes by what they were writing, for this process."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._warned: set[tuple[str, str]] = set()

    def record(self, what: str, err: BaseException) -> None:
        self.counts[what] += 1
        key = (what, type(err).__name__)
        if key not in self._warned:
            self._warned.add(key)
            log.warning(
                "logging %s failed, training goes on (%s: %s); further failures of it "
                "are counted in results.json",
                what,
                type(err).__name__,
                err,
            )

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as e:  # KeyboardInterrupt / SystemExit still stop the run
            self.record(what, e)

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """Failures recorded after `before` (a `snapshot()`), by what."""
        return {k: v - before.get(k, 0) for k, v in self.counts.items() if v > before.get(k, 0)}

    def reset(self) -> None:
        self.counts.clear()
        self._warned.clear()


FAILURES = LogFailures()


def never_fatal(what: str) -> Callable[[F], F]:
    """Decorator: the function's exceptions are recorded under `what`; it then returns None."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with FAILURES.guard(what):
                return fn(*args, **kwargs)
            return None

        return wrapper  # type: ignore[return-value]

    return deco


def guard_logger(logger: Any) -> Any:
    """Wrap a Lightning logger's writing methods on the instance (its class, and so every
    `isinstance` check, stays the same): a failing write is recorded, never raised."""
    if getattr(logger, "_cwdpo_guarded", False):
        return logger
    name = type(logger).__name__
    for meth in LOGGER_METHODS:
        fn = getattr(logger, meth, None)
        if callable(fn):
            setattr(logger, meth, never_fatal(f"{name}.{meth}")(fn))
    logger._cwdpo_guarded = True
    return logger


def histogram_bins(values: Any, num_bins: int = 20) -> tuple[np.ndarray, np.ndarray] | None:
    """(counts, edges) of the finite values, or None when there are none.

    numpy refuses `num_bins` bins over a range narrower than the dtype resolves (e.g. float32
    a = σ(β·margin) ≈ 0.5 for every pair at the first CW-DPO step), and NaN/inf have no bin:
    edges are computed here in float64, widened around a (near-)constant sample.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None
    lo, hi = float(x.min()), float(x.max())
    min_span = 1e-6 * max(1.0, abs(lo), abs(hi))
    if hi - lo < min_span:
        mid = 0.5 * (lo + hi)
        lo, hi = mid - min_span, mid + min_span
    edges = np.linspace(lo, hi, int(num_bins) + 1)
    counts, edges = np.histogram(x, bins=edges)
    return counts, edges


def wandb_histogram(values: Any, num_bins: int = 20) -> Any | None:
    """A `wandb.Histogram` on the project's own bins (see `histogram_bins`), None if empty."""
    import wandb

    bins = histogram_bins(values, num_bins)
    return None if bins is None else wandb.Histogram(np_histogram=bins)


def log_scalars(trainer: Any, metrics: Mapping[str, float], step: int) -> None:
    """To every logger directly: also allowed in hooks where `LightningModule.log` is not."""
    clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    for lg in trainer.loggers:
        with FAILURES.guard(f"{type(lg).__name__} scalars"):
            lg.log_metrics(clean, step=step)
