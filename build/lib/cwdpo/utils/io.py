"""Atomic file writes: a crash never leaves a half-written file that is later read."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from hydra.errors import CompactHydraException


class DiskFullError(CompactHydraException, OSError):
    """ENOSPC while writing a file atomically: one line naming the directory and the file (torch
    reports it as `RuntimeError: ... unexpected pos ...` with the OSError buried as context)."""


def _disk_full(e: BaseException, path: Path) -> DiskFullError | None:
    """A `DiskFullError` when ENOSPC is anywhere in `e`'s cause/context chain, else None."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno == errno.ENOSPC:
            err = DiskFullError(f"no space left on {path.parent} while writing {path.name}")
            err.errno = errno.ENOSPC
            return err
        cur = cur.__cause__ or cur.__context__
    return None


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_created(path: str | Path, directory: bool = False) -> None:
    """Give a temp file/dir the mode a plain `open`/`mkdir` would (0666/0777 & ~umask):
    `mkstemp` makes 0600 files and `mkdtemp` 0700 dirs, so results and weights written
    atomically were unreadable by the group."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write(f)` on a temp file next to `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _as_created(tmp)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        full = _disk_full(e, path)
        if full is not None:
            raise full from e
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def fsync_dir(path: str | Path) -> None:
    """Flush a directory entry (so a completed rename survives a power loss); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Fill a directory via `write(tmp_dir)` next to `path`, then swap it into place.

    Readers never see a half-written `path`: it is either the previous complete directory or
    the new one (a crash between the two renames leaves no `path` at all, never a partial one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _as_created(tmp, directory=True)
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                _as_created(f)  # writers (e.g. safetensors) may leave 0600 files
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            elif f.is_dir():
                _as_created(f, directory=True)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _disk_full(e, path)
        if full is not None:
            raise full from e
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_default) + "\n")


def _default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "__dict__"):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
