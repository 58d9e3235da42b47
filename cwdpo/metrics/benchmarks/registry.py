"""Benchmark name → class: what `eval.tasks=[...]`, the task's config node (`pope:`, `mmmu:`,
...) and the in-training callback look up. Adding a benchmark is one line here (+ its node in
conf/bench/)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cwdpo.metrics.benchmarks.amber import AmberBenchmark
from cwdpo.metrics.benchmarks.base import BenchItem, Benchmark
from cwdpo.metrics.benchmarks.chair import ChairBenchmark
from cwdpo.metrics.benchmarks.mmbench import MMBench
from cwdpo.metrics.benchmarks.mmhal import MmhalBenchmark
from cwdpo.metrics.benchmarks.mmmu import MMMU
from cwdpo.metrics.benchmarks.pope import POPE

BENCHMARKS: dict[str, type[Benchmark]] = {
    "pope": POPE,
    "chair": ChairBenchmark,
    "amber": AmberBenchmark,
    "mmhal": MmhalBenchmark,
    "mmmu": MMMU,
    "mmbench": MMBench,
}


def files_configured(name: str, node: Mapping[str, Any] | None) -> bool:
    """Whether the node points at files: `path`, or (CHAIR, AMBER, MMHal) its own file keys."""
    keys = ("path", *BENCHMARKS[name].file_keys)
    return bool(node) and any(node.get(k) not in (None, "", []) for k in keys)


def no_files_message(name: str) -> str:
    own = BENCHMARKS[name].file_keys
    alt = f" (or its files: {', '.join(f'{name}.{k}=' for k in own)})" if own else ""
    return (
        f"benchmark {name}: no files configured; set {name}.path=<local file or directory>"
        f"{alt} (nothing is downloaded)"
    )


def build_benchmark(name: str, node: Mapping[str, Any] | None) -> Benchmark:
    """The benchmark `name` configured by its node; a missing node or path is a clear error."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    if not node or not files_configured(name, node):
        raise ValueError(no_files_message(name))
    bench = BENCHMARKS[name].from_config(node)
    if node.get("max_new_tokens"):
        bench.max_new_tokens = int(node["max_new_tokens"])
    return bench


def build_task(name: str, node: Mapping[str, Any]) -> Benchmark:
    """The benchmark with its judge (a `judge: {_target_: ...}` node: MMBench's optional
    matcher, MMHal-Bench's rater) instantiated — the one way every benchmark takes a judge."""
    bench = build_benchmark(name, node)
    judge = node.get("judge")
    if isinstance(judge, Mapping):  # a config node; an object (instantiated by Hydra) as is
        import hydra

        judge = hydra.utils.instantiate(judge)
    bench.judge = judge or None
    if bench.needs_judge and bench.judge is None:
        raise ValueError(judge_missing_message(name))
    return bench


def judge_missing_message(name: str) -> str:
    return (
        f"benchmark {name} is scored by a judge and {name}.judge is not set; e.g. "
        f"'{name}.judge={{_target_: cwdpo.metrics.benchmarks.mmhal.RatingJudge, "
        "url: <OpenAI-compatible base URL>, model: <name>, api_key_env: OPENAI_API_KEY}'"
    )


def subset(items: list[BenchItem], limit: Any) -> list[BenchItem]:
    """The first `limit` questions of each split (POPE's three; one elsewhere), all when
    null; an MMBench question keeps all its rotations."""
    if not limit:
        return items
    groups: dict[str, list[str]] = {}
    for it in items:
        g, split = str(it.meta.get("group", it.id)), str(it.meta.get("split", ""))
        if g not in groups.setdefault(split, []):
            groups[split].append(g)
    keep = {g for gs in groups.values() for g in gs[: int(limit)]}
    return [it for it in items if str(it.meta.get("group", it.id)) in keep]
