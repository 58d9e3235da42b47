"""Answers of a policy to benchmark items: batched greedy generation, each DDP rank on its own
shard, answers gathered so that every rank holds the full mapping (= one process's answers);
scored once, on rank 0, and the numbers broadcast (a judge is asked once per answer).

Shared by `cwdpo.eval` (cwdpo.run.benchmark_eval) and the in-training callback
(cwdpo.callbacks.benchmarks)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from cwdpo.metrics.benchmarks.base import BenchItem, Benchmark
from cwdpo.utils.dist import rank_world

if TYPE_CHECKING:
    from cwdpo.model.backbone import VLMBackbone


@torch.no_grad()
def generate_answers(
    backbone: VLMBackbone,
    items: Sequence[BenchItem],
    batch_size: int = 16,
    max_new_tokens: int = 32,
    shard: bool = True,
) -> dict[str, str]:
    """{item id: greedy answer} for every item. With `shard` and an initialized process group,
    rank r generates items r, r + world, ... and the shards are all-gathered (every rank gets
    the whole mapping). `shard=False` (FSDP: every rank must run the same forwards) generates
    everything everywhere."""
    rank, world = rank_world() if shard else (0, 1)
    mine = list(items)[rank::world]
    out: dict[str, str] = {}
    for s in range(0, len(mine), batch_size):
        chunk = mine[s : s + batch_size]
        texts = backbone.generate(
            [[ref.load() for ref in it.images] for it in chunk],
            [it.prompt for it in chunk],
            max_new_tokens=max_new_tokens,
        )
        out.update({it.id: t for it, t in zip(chunk, texts)})
    if world > 1:
        parts: list[dict[str, str] | None] = [None] * world
        dist.all_gather_object(parts, out)
        out = {k: v for p in parts for k, v in (p or {}).items()}
    return out


def score_answers(
    bench: Benchmark, items: Sequence[BenchItem], answers: Mapping[str, str]
) -> dict[str, float]:
    """`bench.score(items, answers)` on rank 0 only, its numbers (or its error) broadcast to
    every rank — so a judge (MMHal-Bench's rater, MMBench's matcher) is called once per answer,
    not once per rank, and every rank logs the same values. Without a process group: a call."""
    rank, world = rank_world()
    if world == 1:
        return bench.score(items, answers)
    box: list[object] = [None]
    failed: Exception | None = None
    if rank == 0:
        try:
            box[0] = ("ok", bench.score(items, answers))
        except Exception as e:  # every rank must leave the broadcast, then all raise
            failed, box[0] = e, ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    if failed is not None:
        raise failed
    status, value = box[0]  # type: ignore[misc]
    if status == "error":
        raise RuntimeError(f"{bench.name}: scoring failed on rank 0: {value}")
    return value  # type: ignore[return-value]
