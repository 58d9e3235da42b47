"""Answers of a policy to benchmark items: batched greedy generation, each DDP rank on its own
shard, answers gathered so that every rank scores the full mapping (= one process's numbers).

Shared by `cwdpo.eval` (cwdpo.run.benchmark_eval) and the in-training callback
(cwdpo.callbacks.benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from cwdpo.metrics.benchmarks.base import BenchItem
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
