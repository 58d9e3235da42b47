"""Process-rank helpers: one place for "which rank am I" outside a Trainer's hooks."""

from __future__ import annotations

from typing import Any


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_rank_zero() -> bool:
    """True on the process that writes run-directory outputs (Lightning's global rank 0)."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def any_rank(trainer: Any, flag: bool) -> bool:
    """True on every rank if `flag` is true on any (a collective: all ranks must call it)."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is None:  # no Trainer strategy (unit tests, plain loops): this process decides
        return bool(flag)
    return bool(strategy.reduce_boolean_decision(bool(flag), all=False))
