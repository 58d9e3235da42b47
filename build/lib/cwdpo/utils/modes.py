"""Module-mode switching shared by evaluation, generation, probes and the doctor."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """`model` in eval mode inside the block; its previous train/eval mode restored after,
    also when the block raises."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
