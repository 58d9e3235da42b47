"""The one shape every benchmark has: read → ask → score answers by id.

Why answers by id: the same scorer then serves a fresh generation, a DDP run (every rank's
answers gathered into one mapping, so the numbers equal one process's by construction) and a
saved predictions file (`{"id", "answer"}` rows) from this or another toolkit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cwdpo.data.records import ImageRef
from cwdpo.errors import DataError


@dataclass
class BenchItem:
    """One question of a benchmark, as the model is asked it.

    `id` is the benchmark's own id (POPE `question_id`, MMBench `index`, MMMU `id`, ...), so
    predictions files line up with other toolkits'. `prompt` is the exact user text (the
    benchmark's official prompt convention; `<image k>` placeholders place image k). `meta`
    holds what scoring needs (label, options, answer, category, split, ...).
    """

    id: str
    images: list[ImageRef]
    prompt: str
    meta: dict[str, Any] = field(default_factory=dict)


#: Keys of a task's config node that the runner reads (never passed to the constructor).
RUNNER_KEYS = frozenset(
    {"predictions", "limit", "scoring", "batch_size", "max_new_tokens", "judge"}
)


class Benchmark(ABC):
    """A benchmark: `read()` its local files, `score()` answers by the official rules.

    Metric names are flat and prefixed with the benchmark's name ("pope/adversarial/f1"), in
    the unit the field reports (percent where the papers print percent).
    """

    name: ClassVar[str]
    #: generation budget per answer (short answers: yes/no, a letter)
    max_new_tokens: int = 32
    #: optional judge for answers the official rules cannot parse (MMBench's LLM matcher);
    #: the runner sets it from the node's `judge` entry, None = rules only
    judge: Any = None
    #: whether scoring cannot work without `judge` (MMHal-Bench's rater)
    needs_judge: ClassVar[bool] = False
    #: config keys that may name the files instead of `path` (the release folder)
    file_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_config(cls, node: Mapping[str, Any]) -> Benchmark:
        """The benchmark a task's config node describes (`pope: {path: ..., splits: ...}`):
        its keys are the constructor's keyword arguments, except the runner's own
        (`RUNNER_KEYS`: predictions file, subset size, scoring protocol, batch size, judge)."""
        kwargs = {k: v for k, v in node.items() if k not in RUNNER_KEYS}
        try:
            return cls(**kwargs)
        except TypeError as e:  # a typo'd key names the benchmark and its keys
            raise ValueError(f"{cls.name}: bad config key(s) {sorted(kwargs)}: {e}") from e

    def check(self) -> None:
        """Cheap checks before any model loads (files exist, optional dependencies installed);
        `read()` validates the rows later. Default: the `path` attribute exists."""
        path = getattr(self, "path", None)
        if path and not Path(str(path)).exists():
            raise DataError(f"{self.name}.path={path}: no such file or directory")

    def protocol_note(self) -> str:
        """What makes this run's numbers differ from the published protocol ("" when nothing)."""
        return ""

    @abstractmethod
    def read(self) -> list[BenchItem]:
        """Every item, from the configured local files; errors name file, row and field."""

    @abstractmethod
    def score(self, items: Sequence[BenchItem], answers: Mapping[str, str]) -> dict[str, float]:
        """Official metrics of `answers` ({item id: generated text}) over `items`."""


def require_answers(name: str, items: Sequence[BenchItem], answers: Mapping[str, str]) -> list[str]:
    """The answer of every item, in item order; a missing id is an error naming it (a
    predictions file that lacks rows must not score as if they were wrong or absent)."""
    missing = [it.id for it in items if it.id not in answers]
    if missing:
        raise DataError(
            f"{name}: no answer for {len(missing)} of {len(items)} item(s), e.g. id "
            f"{missing[0]!r}; every item id needs one answer"
        )
    return [str(answers[it.id]) for it in items]
