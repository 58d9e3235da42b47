"""`win vs baseline`: each run's saved test captions re-judged against its baseline run's."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra.utils

from cwdpo.analysis.caption_winrate import win_rate
from cwdpo.analysis.runs import Loaded, eval_data, final_outputs

log = logging.getLogger(__name__)


def win_vs_baseline(loaded: Sequence[Loaded], baseline: str) -> None:
    """Adds `win_vs_baseline` to each non-baseline row, in place.

    A run's baseline is the `baseline`-experiment run with the same seed and test data whose
    overrides are the largest subset of the run's own (so a sweep that also ran the baseline
    under its own setting, e.g. harder negatives, is compared with that one). The judge is the
    pipeline's: ground-truth facts where the source knows them, else reference CIDEr.
    """
    data_of = {run: eval_data(run) for run, _, _ in loaded}  # each config parsed once
    bases = [(run, set(ov), row) for run, (name, ov), row in loaded if name == baseline]
    data_cache: dict[str, tuple[Any, list[Any]] | str] = {}
    for run, (name, ov), row in loaded:
        if name == baseline:
            continue
        data = data_of[run]
        outputs = final_outputs(run)
        if data is None or outputs is None:
            continue
        base_run = _baseline_run(run, set(ov), row, bases, data_of, baseline)
        base_outputs = final_outputs(base_run) if base_run else None
        if base_outputs is None or len(base_outputs) != len(outputs):
            continue
        key = json.dumps(data, sort_keys=True)
        if key not in data_cache:
            data_cache[key] = _test_records(data)
        if isinstance(data_cache[key], str):  # the data is not readable here: skip, said once
            continue
        source, records = data_cache[key]
        if len(records) != len(outputs):
            log.warning(
                "%s: %d saved test captions but its config gives %d records; no win-rate",
                run,
                len(outputs),
                len(records),
            )
            continue
        row["win_vs_baseline"] = win_rate(source, records, outputs, base_outputs)[
            "winrate/win_rate"
        ]


def _baseline_run(
    run: Path,
    ov: set[str],
    row: dict[str, float],
    bases: Sequence[tuple[Path, set[str], dict[str, float]]],
    data_of: dict[Path, dict[str, Any] | None],
    baseline: str,
) -> Path | None:
    """The baseline run of the same seed and test data with the most of `run`'s overrides."""
    match = sorted(
        (-len(b_ov), str(b_run), b_run)
        for b_run, b_ov, b_row in bases
        if b_row["seed"] == row["seed"] and b_ov <= ov and data_of[b_run] == data_of[run]
    )
    if not match:
        return None
    if len(match) > 1 and match[0][0] == match[1][0]:
        log.warning("%s: several %s runs fit as its baseline; using %s", run, baseline, match[0][1])
    return match[0][2]


def _test_records(data: dict[str, Any]) -> tuple[Any, list[Any]] | str:
    """(source, test records) of a run's config, or why they cannot be read on this machine."""
    try:
        source = hydra.utils.instantiate(data["source"])
        return source, source.captions(data["split"])[: data["n_records"]]
    except Exception as err:  # e.g. a cluster's COCO path: the report still runs without it
        log.warning("win vs baseline skipped for data %s: %s", data["source"].get("_target_"), err)
        return f"{type(err).__name__}: {err}"
