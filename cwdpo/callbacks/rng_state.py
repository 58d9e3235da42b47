"""The global torch / Python / NumPy (/ CUDA) RNG states, kept in every Lightning checkpoint.

Lightning checkpoints do not hold them; on-policy negative sampling (`generate`) draws from the
global torch RNG, so without `GlobalRNGState` a resumed run samples different negatives.
Why in callbacks: it is a Lightning callback (its `state_dict` is saved with the checkpoint),
one of `faults.reliability_callbacks`; the two helpers beside it hold the states as plain types
+ tensors, so checkpoints stay loadable with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch


def collect_rng_state() -> dict[str, Any]:
    """Global RNG states as plain types + tensors (loadable with weights_only=True)."""
    py = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            str(name),
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(gauss),
        ],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class GlobalRNGState(L.Callback):
    """Saves the global RNG states in each checkpoint and restores them on resume.

    Lightning checkpoints do not hold them; on-policy negative sampling (`generate`) draws
    from the global torch RNG, so without this a resumed run samples different negatives.
    They are restored at the first training batch after the restart, i.e. after every
    `on_train_start` hook (which may sample, e.g. probe sets) has run.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return collect_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            set_rng_state(self._pending)
            self._pending = None
