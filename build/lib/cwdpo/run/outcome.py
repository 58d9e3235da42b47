"""Why a run stopped, said once, where a user looks: the last line of the run dir's `train.log`
is `run finished: …`, `run failed: <error>` or `run stopped: <signal> …` with the exact resume
command. A signal stop also leaves `<run>/interrupted.json` (signal, stage, step, checkpoint,
command), prints that line last on stderr and exits 128 + the signal number (143 for SIGTERM,
130 for Ctrl-C), never 0: a scheduler or a shell loop sees that the run did not finish."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cwdpo.utils.io import atomic_write_json
from cwdpo.utils.signals import MARKER, Interruption, interruption

log = logging.getLogger("cwdpo.train")


@contextlib.contextmanager
def run_outcome(cfg: Any) -> Iterator[None]:
    """Around a whole `cwdpo.train` run: record how it ended (the run dir is read at the end,
    after `resume=<dir>` has pointed `paths.output_dir` at the run being continued)."""
    try:
        yield
    except BaseException as e:
        out = _run_dir(cfg)
        info = interruption(e)
        if info is None:
            if not (isinstance(e, SystemExit) and e.code in (0, None)):
                _record(out, f"run failed: {_summary(e)}", logging.ERROR)
            raise
        line = stopped(out, info)
        print(line, file=sys.stderr, flush=True)
        raise SystemExit(128 + _signum(info.signal)) from None
    out = _run_dir(cfg)
    if out is not None and is_rank_zero():
        (out / MARKER).unlink(missing_ok=True)
    _record(out, f"run finished: {out / 'results.json' if out else ''}", logging.INFO)


def stopped(out: Path | None, info: Interruption) -> str:
    """The line (and, rank 0, the marker) for a run stopped by a signal."""
    where = f" during stage {info.stage} at step {info.step}" if info.stage else ""
    if info.checkpoint is not None:
        saved = f"; checkpoint saved to {info.checkpoint}"
    else:
        failed = f" (saving one failed: {info.error})" if info.error else ""
        saved = (
            f"; no checkpoint at this point{failed} (finished stages are kept, an unfinished "
            "one continues from its newest checkpoints/<stage>/last*.ckpt)"
        )
    from cwdpo.callbacks.faults import resume_command

    command = resume_command(out) if out is not None else "python -m cwdpo.train resume=<run dir>"
    line = f"run stopped: {info.signal}{where}{saved}. Resume with `{command}`"
    if out is not None and is_rank_zero():
        marker = {
            "signal": info.signal,
            "stage": info.stage,
            "step": info.step,
            "checkpoint": str(info.checkpoint) if info.checkpoint else None,
            "resume": command,
            "time": time.time(),
        }
        with contextlib.suppress(OSError):  # a full disk must not hide the line itself
            atomic_write_json(out / MARKER, marker)
    _record(out, line, logging.WARNING)
    return line


def _record(out: Path | None, line: str, level: int) -> None:
    """Write `line` to the log files only (Hydra's file handler: this attempt's train.log; the
    terminal already shows the error or the printed line) and, when the run dir is another
    directory (`resume=<dir>` with its own Hydra dir), append it to its train.log — only once
    this process holds the run dir (a refused attempt, e.g. while another process runs there,
    writes nothing into it)."""
    record = log.makeRecord(log.name, level, __file__, 0, line, None, None)
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for h in files:
        with contextlib.suppress(Exception):  # a full disk must not hide the error itself
            h.handle(record)
    if out is None or not _holds(out) or not is_rank_zero():
        return
    target = (out / "train.log").resolve()
    if target in {Path(h.baseFilename).resolve() for h in files} or not out.is_dir():
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with contextlib.suppress(OSError), target.open("a") as f:
        f.write(f"[{stamp}][{log.name}][{logging.getLevelName(level)}] - {line}\n")


def is_rank_zero() -> bool:
    """Rank 0 writes the run dir (Lightning imported only once a run got that far)."""
    from cwdpo.utils.dist import is_rank_zero as rank_zero

    return rank_zero()


def _holds(out: Path) -> bool:
    import json
    import os

    from cwdpo.utils.run_dir import LOCK_NAME

    try:
        return json.loads((out / LOCK_NAME).read_text()).get("pid") == os.getpid()
    except (OSError, ValueError, AttributeError):
        return False


def _run_dir(cfg: Any) -> Path | None:
    try:
        return Path(str(cfg.paths.output_dir))
    except Exception:  # no Hydra run (an error before it, or outside the CLI)
        return None


def _summary(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    more = " (traceback on stderr)" if len(lines) > 1 else ""
    return f"{type(e).__name__}: {text}{more}" if text else type(e).__name__


def _signum(name: str) -> int:
    import signal

    return int(signal.Signals[name])
