"""One run, one directory: unique run dirs, a lock per live run, writable-or-a-clear-error.

Why: Hydra's default run dir has a 1-second timestamp, so two runs started together shared a
directory (config from one, CSV rows from both, rc 0); an explicit shared `hydra.run.dir` did
the same; a read-only directory surfaced as Hydra's `Unable to configure handler 'file'`.

- `RunDirCallback` (a Hydra callback, conf/hydra/default.yaml) runs before Hydra creates the
  run dir or writes anything into it: a timestamped (`${now:...}`) dir is claimed with an
  atomic `mkdir`, adding `_1`, `_2`, ... when another run took that name first; an explicit
  dir must be writable and not held by a live run (`RunDirError`, one line).
- `hold_run_dir` takes `<run>/.cwdpo.lock` (pid, host, process start time) with `O_EXCL`
  for the life of the process. A lock whose process is gone (SIGKILL, power loss) is stale
  and taken over; a live one is refused. Re-entrant within one process. Secondary ranks of a
  multi-process job (RANK / LOCAL_RANK / NODE_RANK / SLURM_PROCID > 0) share rank 0's dir and
  take no lock.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.errors import CompactHydraException

log = logging.getLogger(__name__)

LOCK_NAME = ".cwdpo.lock"
RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
_HELD: dict[Path, Path] = {}  # run dir → lock file, held by this process
_NOTICES: list[str] = []  # stale locks taken over before Hydra configured logging


class RunDirError(CompactHydraException, RuntimeError):
    """The run directory is in use by a live run, not writable, or not a run to resume."""


class MissingRunDirError(RunDirError, FileNotFoundError):
    """`resume=<dir>` names a directory that does not exist."""


def is_secondary_rank() -> bool:
    """A non-zero rank of a multi-process job: it writes into rank 0's directory."""
    for k in RANK_VARS:
        try:
            if int(os.environ.get(k) or 0) > 0:
                return True
        except ValueError:
            continue
    return False


# ----------------------------------------------------------------------------- unique dirs
def claim_fresh_dir(path: str | Path) -> Path:
    """Create `path` atomically, or the first free `path_1`, `path_2`, ... (never an existing one)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise not_writable(path.parent, e) from None
    for i in range(10_000):
        cand = path if i == 0 else path.with_name(f"{path.name}_{i}")
        try:
            cand.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise not_writable(cand, e) from None
        return cand
    raise RunDirError(f"no free run directory next to {path} (tried _1 … _9999)")


RUN_DIR_HINT = (
    "make it writable or choose another with hydra.run.dir=<dir> (or paths.log_dir=<dir>)"
)


def not_writable(
    path: Path, e: BaseException, what: str = "run directory", hint: str = RUN_DIR_HINT
) -> RunDirError:
    why = getattr(e, "strerror", None) or e
    return RunDirError(f"{what} {path} is not writable ({type(e).__name__}: {why}): {hint}")


def check_writable(path: str | Path, what: str = "run directory", hint: str = RUN_DIR_HINT) -> Path:
    """Create `path` if needed and prove a file can be written in it; else `RunDirError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".cwdpo-write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise not_writable(path, e, what, hint) from None
    return path


# ----------------------------------------------------------------------------- the lock
def _start_time(pid: int) -> str | None:
    """The process start time (clock ticks since boot) from /proc: tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(holder: dict[str, Any]) -> bool:
    pid = int(holder.get("pid", -1))
    if holder.get("host") != socket.gethostname():
        return True  # cannot check another machine's processes: assume it runs
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = holder.get("start_time")
    return started is None or _start_time(pid) in (None, started)


def _read(lock: Path) -> dict[str, Any] | None:
    try:
        return json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written by a process killed mid-write: stale


def _describe(holder: dict[str, Any]) -> str:
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {when}"


def hold_run_dir(run_dir: str | Path) -> Path | None:
    """Lock `run_dir` for this process (until exit or `release_run_dir`).

    Raises `RunDirError` when a live process holds it or it is not writable. Returns the lock
    file (None on secondary ranks, which take no lock).
    """
    run_dir = Path(run_dir).resolve()
    if is_secondary_rank():
        return None
    if run_dir in _HELD:
        return _HELD[run_dir]
    check_writable(run_dir)
    lock = run_dir / LOCK_NAME
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start_time": _start_time(os.getpid()),
        "since": time.time(),
    }
    for _ in range(20):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read(lock)
            if holder is None:
                continue  # released meanwhile: try again
            if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                break  # ours (e.g. taken before a fork-free re-entry)
            if _alive(holder):
                raise RunDirError(
                    f"run directory {run_dir} is in use by a live run ({_describe(holder)}; "
                    f"lock {lock}): wait for it, or start this run elsewhere (leave out "
                    "hydra.run.dir for a fresh one); if that process is gone, delete the lock file"
                ) from None
            _take_over_stale(lock, holder)
            continue
        except OSError as e:
            raise not_writable(run_dir, e) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise RunDirError(f"could not take the lock {lock}: it keeps changing hands")
    _HELD[run_dir] = lock
    return lock


def _take_over_stale(lock: Path, holder: dict[str, Any]) -> None:
    """Move a dead run's lock aside (one process wins the rename), keeping a live one."""
    aside = lock.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return  # another process took it over first
    moved = _read(aside)
    if (
        moved is not None and moved != holder and _alive(moved)
    ):  # a fresh lock raced in: put it back
        with contextlib.suppress(FileExistsError):
            os.link(aside, lock)
    else:  # logged now and again once the run's log exists (RunDirCallback.on_job_start)
        _NOTICES.append(
            f"run directory {lock.parent}: taking over the lock of a run that is "
            f"gone ({_describe(holder)})"
        )
        log.warning(_NOTICES[-1])
    aside.unlink(missing_ok=True)


def release_run_dir(run_dir: str | Path | None = None) -> None:
    """Drop this process's lock on `run_dir` (all of them when None)."""
    dirs = list(_HELD) if run_dir is None else [Path(run_dir).resolve()]
    for d in dirs:
        lock = _HELD.pop(d, None)
        if lock is not None:
            holder = _read(lock)
            if holder and holder.get("pid") == os.getpid():
                lock.unlink(missing_ok=True)


atexit.register(release_run_dir)


# ----------------------------------------------------------------------------- Hydra hook
try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra < 1.1
    _HydraCallback = object  # type: ignore[assignment,misc]


def _refusing(fn: Any) -> Any:
    """Hydra turns a callback's exception into a warning and carries on: exit instead, with
    the one-line message (the traceback too with HYDRA_FULL_ERROR=1)."""

    def wrapped(self: Any, config: Any, **kwargs: Any) -> None:
        try:
            fn(self, config, **kwargs)
        except RunDirError as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                traceback.print_exc()
            print(str(e), file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    return wrapped


class RunDirCallback(_HydraCallback):  # type: ignore[misc]
    """Before Hydra writes into the run dir: make it unique (timestamped) or check it is free."""

    @_refusing
    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import OmegaConf, open_dict, read_write

        if is_secondary_rank():
            return
        raw = OmegaConf.to_container(config.hydra.run, resolve=False).get("dir", "")
        run_dir = Path(str(config.hydra.run.dir))
        if "${now:" in str(raw):  # a timestamped default: never share it with another run
            run_dir = claim_fresh_dir(run_dir)
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.run.dir = str(run_dir)
        hold_run_dir(run_dir)

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        release_run_dir()  # the run is over in this process (also for in-process re-runs)

    @_refusing
    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import OmegaConf, open_dict, read_write

        raw = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("dir", "")
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if "${now:" not in str(raw):
            check_writable(sweep_dir)
            return
        sweep_dir = claim_fresh_dir(sweep_dir)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.sweep.dir = str(sweep_dir)
            # Each job's config is re-composed from these overrides (a fresh `${now:}` would
            # be the master's timestamp again, not the claimed directory).
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir={sweep_dir}")

    @_refusing
    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        # Multirun jobs (and a single run, re-entrantly): the job's own directory.
        hold_run_dir(str(config.hydra.runtime.output_dir))
        while _NOTICES:
            log.warning(_NOTICES.pop(0))

    def on_job_end(self, config: Any, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.get().mode.name == "MULTIRUN":  # sequential jobs in one process
            release_run_dir(str(config.hydra.runtime.output_dir))
