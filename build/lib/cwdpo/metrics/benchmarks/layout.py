"""Where a benchmark's local files are: an explicit path per file, else the release's layout
under one root (`<task>.path=`), so one key points a task at a downloaded release."""

from __future__ import annotations

from pathlib import Path


def local_file(task: str, key: str, explicit: str | None, root: str | None, default: str) -> str:
    """`explicit` if given, else `root/default`; neither is an error naming both keys."""
    if explicit:
        return str(explicit)
    if root:
        return str(Path(root) / default)
    raise ValueError(
        f"{task}: give {key}= (a file) or path= (the release folder, {default} inside)"
    )
