"""The attempts of a run (`<run>/attempts.json`): when each started and ended, so that a resumed
run's `wall_seconds` counts every attempt, killed ones included.

Why its own module in cwdpo/run: the pipeline opens an attempt and `results` closes it; a killed
attempt cannot record its end, so it is read off the run directory's file times here.
"""

from __future__ import annotations

import json
from pathlib import Path

from cwdpo.utils.io import atomic_write_json

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
    path = Path(run_dir) / ATTEMPTS
    try:
        attempts = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if attempts:
        attempts[-1]["end"] = end
        atomic_write_json(path, attempts)
