"""Memory of a benchmark step: the peak above the level at entry (CUDA allocator stats, or
sampled RSS on CPU), and the exact bytes of weights, reference, gradients and optimizer state."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from typing import Any

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _return_memory_eagerly() -> None:
    """glibc: give free heap pages back to the OS (malloc_trim), so that a step re-using freed
    heap memory faults its pages in again and shows up in RSS."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self.base = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _return_memory_eagerly()
            self.base = _rss_bytes()
            self._stop = threading.Event()
            self._max = self.base

            def sample() -> None:
                while not self._stop.is_set():
                    self._max = max(self._max, _rss_bytes())
                    time.sleep(0.0005)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def seen(self) -> int:
        """The peak above the entry level observed so far (inside the block)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return self._max - self.base

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
            self.total = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss_bytes())
            self.peak = self._max - self.base
            self.total = self._max


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def state_bytes(model: torch.nn.Module, reference: torch.nn.Module | None, opt) -> dict[str, int]:
    """Exact bytes held between steps: weights, reference copy, gradients, optimizer state."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    opt_state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    out = {
        "weights": _bytes(params),
        "reference": _bytes(reference.parameters()) if reference is not None else 0,
        "grads": _bytes(trainable),
        "optimizer": _bytes(opt_state),
        "trainable_params": sum(p.numel() for p in trainable),
    }
    out["total"] = out["weights"] + out["reference"] + out["grads"] + out["optimizer"]
    return out
