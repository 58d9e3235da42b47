"""Checkpoint files, read and written safely: the one place cwdpo calls `torch.load`/`torch.save`
on a checkpoint.

- `AtomicCheckpointIO` (Lightning CheckpointIO, every stage's trainer): written to a temp file in
  the target directory, fsynced, then `os.replace`d over the old one, so `last.ckpt` is always a
  complete file; loaded with `torch.load(weights_only=True)` only (no arbitrary unpickling).
- `safe_torch_load` / `atomic_torch_save`: the same for any other `.pt`/`.ckpt` file, with
  errors that name the file (`UnsafeCheckpointError`, `CorruptCheckpointError`).

Why in utils: file IO with no knowledge of stages or run directories (that is
`cwdpo/run/run_state.py`), usable by every layer that reads or writes a checkpoint.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from hydra.errors import CompactHydraException
from lightning.fabric.plugins import TorchCheckpointIO

from cwdpo.utils.io import atomic_write

log = logging.getLogger(__name__)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds objects that `torch.load(weights_only=True)` refuses to unpickle."""


class CorruptCheckpointError(CompactHydraException, RuntimeError):
    """A checkpoint file that cannot be read (truncated, a partial copy): one line naming it and
    what to do. No silent fallback to an older file: that would redo steps unannounced, and
    cwdpo's own writes are atomic, so a broken file came from outside (a copy, a disk fault)."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` into a temp file next to `path`, fsync, then rename over `path`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise corrupt_checkpoint(path, e) from e
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain containers "
            f"(torch.load(weights_only=True) is the only loader cwdpo uses). {e}"
        ) from e
    except PermissionError:
        raise
    except (RuntimeError, EOFError, ValueError, OSError) as e:  # the zip reader, a short file
        raise corrupt_checkpoint(path, e) from e


def corrupt_checkpoint(path: Path, e: BaseException) -> CorruptCheckpointError:
    """What to do about an unreadable checkpoint, in one line. A stage's `last*.ckpt` (what
    `resume` reads) can be deleted: the stage then restarts from its beginning."""
    why = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:120] or type(e).__name__
    if path.name.startswith("last"):
        todo = (
            f"delete it to restart stage {path.parent.name} from its beginning on resume "
            "(finished stages are kept), or put back a complete copy"
        )
        other = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path)
        if other:
            todo += f"; other checkpoints there: {', '.join(other)} (move one over {path.name})"
    else:
        todo = "put back a complete copy"
    return CorruptCheckpointError(
        f"checkpoint {path} cannot be read, it is truncated or corrupt ({why}): {todo}"
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: atomic writes (temp + fsync + rename), weights_only loads."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            log.warning(
                "weights_only=False requested for %s: loading with weights_only=True anyway", path
            )
        return safe_torch_load(path, map_location=map_location)

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)
