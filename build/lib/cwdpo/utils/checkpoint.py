"""Crash-safe checkpoints and the run-directory state that `resume` reads.

- `AtomicCheckpointIO`: Lightning checkpoints are written to a temp file in the target
  directory, fsynced, then `os.replace`d over the old one, so `last.ckpt` is always a complete
  file; they are loaded with `torch.load(weights_only=True)` only (no arbitrary unpickling).
- `ResumableSampler`: the training shuffle order of epoch e depends only on (seed, e), and an
  iteration can start mid-epoch, so a run resumed from a mid-epoch checkpoint sees the very
  batches an uninterrupted run sees.
- `GlobalRNGState`: a callback whose state (saved inside every Lightning checkpoint) is the
  global torch / Python / NumPy RNG state, for what draws from it (on-policy sampling).
- `RunState`: per-stage "done" markers in `<run>/checkpoints/`, written atomically after the
  stage's HF save and evaluation, and the stage's `last.ckpt` to resume a stage mid-way.
  (The curves' shared files, `stages.json` and the CSV appends, are `utils/run_files.py`'s.)
"""

from __future__ import annotations

import logging
import pickle
import random
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.errors import CompactHydraException
from lightning.fabric.plugins import TorchCheckpointIO
from torch.utils.data import Sampler

from cwdpo.utils.io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds objects that `torch.load(weights_only=True)` refuses to unpickle."""


class CorruptCheckpointError(CompactHydraException, RuntimeError):
    """A checkpoint file that cannot be read (truncated, a partial copy): one line naming it and
    what to do. No silent fallback to an older file: that would redo steps unannounced, and
    cwdpo's own writes are atomic, so a broken file came from outside (a copy, a disk fault)."""


# ---------------------------------------------------------------------------- files
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


# ---------------------------------------------------------------------------- data order
class ResumableSampler(Sampler[int]):
    """A seeded permutation per epoch, that can start after the first k batches of an epoch.

    Epoch e's order is a function of (seed, e) only (no generator state carried across
    epochs), so a run resumed at (epoch e, batch k) continues exactly where an uninterrupted
    run would be. Lightning calls `set_epoch` before every epoch but the first of a `fit`.
    """

    def __init__(self, n: int, seed: int, batch_size: int) -> None:
        self.n, self.seed, self.batch_size = n, int(seed), batch_size
        self.epoch = 0
        self._skip = 0

    def permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**62))
        return torch.randperm(self.n, generator=g).tolist()

    def start_at(self, epoch: int, batches: int) -> None:
        """The next iteration is epoch `epoch`, minus its first `batches` batches."""
        self.epoch, self._skip = int(epoch), int(batches) * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._skip = int(epoch), 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        perm = self.permutation(self.epoch)
        skip, self._skip = self._skip, 0
        yield from perm[skip:]


def train_position(sampler: ResumableSampler | None, trainer: Any) -> dict[str, int] | None:
    """(epoch, batches consumed by training in it) for a checkpoint taken now.

    Read from Lightning's batch progress, not from the sampler: the loader prefetches, so the
    sampler is ahead of what training has consumed. A checkpoint on an epoch's last batch
    resumes at the start of the next epoch (as Lightning's loops do). Single-process only: under
    DDP the epoch restarts (Lightning's default), so resume is not bitwise there.
    """
    if sampler is None or trainer is None or getattr(trainer, "world_size", 1) > 1:
        return None  # multi-process: Lightning wraps the sampler in a distributed one
    progress = trainer.fit_loop.epoch_loop.batch_progress
    if progress.is_last_batch:
        return {"epoch": sampler.epoch + 1, "batches": 0}
    return {"epoch": sampler.epoch, "batches": int(progress.current.ready)}


# ---------------------------------------------------------------------------- global RNG
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


# ---------------------------------------------------------------------------- run state
class RunState:
    """Which stages of a run directory are done, and where an unfinished one can resume.

    A stage is done when `<run>/checkpoints/<stage>.done.json` (metrics + generated outputs,
    written atomically after the HF save and evaluation) and `<run>/checkpoints/<stage>_hf/`
    exist. The pseudo-stage "start" (evaluation before training) has a marker but no HF dir.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"

    def marker(self, stage: str) -> Path:
        return self.ckpt_dir / f"{stage}.done.json"

    def hf_dir(self, stage: str) -> Path:
        return self.ckpt_dir / f"{stage}_hf"

    def stage_ckpt_dir(self, stage: str) -> Path:
        return self.ckpt_dir / stage

    def is_done(self, stage: str) -> bool:
        if not self.marker(stage).is_file():
            return False
        return stage == "start" or (self.hf_dir(stage) / "config.json").is_file()

    def load_done(self, stage: str) -> dict[str, Any] | None:
        if not self.is_done(stage):
            return None
        import json

        return json.loads(self.marker(stage).read_text())

    def mark_done(self, stage: str, metrics: Mapping[str, Any], outputs: list[str]) -> None:
        atomic_write_json(
            self.marker(stage), {"stage": stage, "metrics": dict(metrics), "outputs": list(outputs)}
        )

    def last_checkpoint(self, stage: str) -> Path | None:
        """The newest `last*.ckpt` (ModelCheckpoint writes `last-v1.ckpt` if it could not
        restore its own state, e.g. after its settings changed)."""
        d = self.stage_ckpt_dir(stage)
        found = (
            sorted(d.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime_ns) if d.is_dir() else []
        )
        return found[-1] if found else None

    def csv_file(self, stage: str) -> Path:
        """The stage's metrics CSV (conf/logger/csv.yaml: `<run>/csv/<stage>/metrics.csv`)."""
        return self.run_dir / "csv" / stage / "metrics.csv"

    def clear(self, stages: list[str]) -> None:
        """A fresh (non-resume) run in a used directory: drop markers, Lightning checkpoints and
        metrics CSVs of earlier runs, so nothing stale is ever resumed from or kept (the CSV
        logger keeps an existing file's rows, for resume)."""
        stale = [self.marker(s) for s in ["start", *stages] if self.marker(s).exists()]
        stale += [self.stage_ckpt_dir(s) for s in stages if self.stage_ckpt_dir(s).exists()]
        stale += [self.csv_file(s) for s in stages if self.csv_file(s).exists()]
        (self.run_dir / "wandb_run_id").unlink(missing_ok=True)  # a fresh run is a new W&B run
        if stale:
            log.warning(
                "fresh run in %s: removing state of an earlier run (%s); pass resume=true "
                "to continue it instead",
                self.run_dir,
                ", ".join(p.name for p in stale),
            )
        for p in stale:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


ATTEMPTS = "attempts.json"
NOT_ACTIVITY = (".hydra", ".cwdpo.lock", ATTEMPTS)  # written by the next attempt before it starts
# (and top-level `*.log`: Hydra appends the next attempt's log to it with hydra.run.dir=<run>)


def _last_write(run_dir: Path, after: float) -> float:
    """The latest mtime of a file the previous attempt wrote (checkpoints, CSVs, markers, its
    log) — how long a killed attempt lasted, as it could not record its end itself."""
    latest = after
    for f in run_dir.rglob("*"):
        rel = f.relative_to(run_dir).parts
        if any(part in NOT_ACTIVITY for part in rel) or (len(rel) == 1 and f.suffix == ".log"):
            continue
        try:
            if f.is_file():
                latest = max(latest, f.stat().st_mtime)
        except OSError:
            continue
    return latest


def begin_attempt(
    run_dir: str | Path, start: float, resuming: bool, write: bool = True
) -> list[float]:
    """Record an attempt of a run in `<run>/attempts.json`; return the wall seconds of the earlier
    ones (a resumed run's `wall_seconds` counts every attempt, killed ones included).

    A killed attempt's end is the last time it wrote a file (`_last_write`), taken before this
    attempt writes anything but its Hydra files and lock."""
    run_dir = Path(run_dir)
    path = run_dir / ATTEMPTS
    attempts: list[dict[str, float]] = []
    if resuming and path.is_file():
        import json

        try:
            attempts = [a for a in json.loads(path.read_text()) if "start" in a]
        except (OSError, ValueError):
            attempts = []
        for a in attempts:
            if "end" not in a:
                a["end"] = min(start, _last_write(run_dir, a["start"]))
    earlier = [max(0.0, a["end"] - a["start"]) for a in attempts]
    if write:
        atomic_write_json(path, [*attempts, {"start": start}])
    return earlier


def end_attempt(run_dir: str | Path, end: float) -> None:
    """Close the last attempt in `<run>/attempts.json` (a finished run)."""
    import json

    path = Path(run_dir) / ATTEMPTS
    try:
        attempts = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if attempts:
        attempts[-1]["end"] = end
        atomic_write_json(path, attempts)


def resume_dir(resume: Any, output_dir: str | Path) -> Path | None:
    """`resume=null|false` → None; `resume=true` → the run's own output dir; `resume=<path>` →
    that run directory (which must exist)."""
    if (
        resume is None
        or resume is False
        or (isinstance(resume, str) and resume.lower() in ("", "false", "null", "none"))
    ):
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() == "true"):
        return Path(output_dir)
    p = Path(str(resume)).expanduser()
    if not p.is_dir():
        from cwdpo.utils.run_dir import MissingRunDirError

        raise MissingRunDirError(f"resume={resume}: no such run directory")
    return p


def config_changes(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    prefix: str = "",
    ignore: tuple[str, ...] = ("resume",),
) -> list[str]:
    """Dotted keys whose values differ between two plain config dicts."""
    out: list[str] = []
    for k in sorted(set(old) | set(new), key=str):
        key = f"{prefix}{k}"
        if key in ignore:
            continue
        a, b = old.get(k, "<missing>"), new.get(k, "<missing>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_changes(a, b, key + ".", ignore)
        elif a != b:
            out.append(key)
    return out
