"""Caption-level McNemar tests for per-caption binary rates (e.g. companion hallucination).

A rate such as `companion_halluc` is a share of captions with a binary flag, so two settings can
be compared caption by caption (same seed, same test image) rather than only seed by seed: far
more pairs than 5 seeds, hence far more power for rare events. The flags are recomputed from
each run's saved test captions (`final_outputs`) and its test records' ground-truth scenes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cwdpo.analysis.baseline import _test_records
from cwdpo.analysis.inference import mcnemar_exact
from cwdpo.analysis.runs import eval_data, final_outputs
from cwdpo.data.verifier import mentions_object, verify

Flags = list[bool | None]  # None: the caption is not at risk (not in the rate's denominator)


def _companion_halluc(outputs: Sequence[str], scenes: Sequence[Any], cooc: Any) -> Flags | None:
    """At risk: trigger present, companion absent; flag: the caption mentions the companion
    (cwdpo.metrics.hallucination.caption_metrics's definition)."""
    if cooc is None:
        return None
    trigger, comp = (tuple(x) for x in cooc)
    out: Flags = []
    for o, s in zip(outputs, scenes):
        ids = {(ob.colour, ob.shape) for ob in s.objects}
        out.append(mentions_object(o, *comp) if trigger in ids and comp not in ids else None)
    return out


def _chair_s(outputs: Sequence[str], scenes: Sequence[Any], cooc: Any) -> Flags:
    """Every caption at risk; flag: at least one hallucinated object (CHAIR_s)."""
    return [verify(o, s).hallucinated > 0 for o, s in zip(outputs, scenes)]


def _malformed(outputs: Sequence[str], scenes: Sequence[Any], cooc: Any) -> Flags:
    """Every caption at risk; flag: the verifier could not parse it."""
    return [bool(verify(o, s).malformed) for o, s in zip(outputs, scenes)]


# metric → per-caption flags(outputs, scenes, cooc): the per-caption binary rates the report
# can test caption by caption
CAPTION_RATES: dict[str, Callable[[Sequence[str], Sequence[Any], Any], Flags | None]] = {
    "companion_halluc": _companion_halluc,
    "chair_s": _chair_s,
    "malformed": _malformed,
}


def run_flags(run: Path, metric: str, cache: dict[str, Any]) -> Flags | None:
    """Per-test-caption flags of `metric` for one run, or None when its saved captions, test
    records or scenes are not available here. `cache`: test records per data config, shared
    across calls so each test set is rebuilt once."""
    if metric not in CAPTION_RATES:
        return None
    data, outputs = eval_data(run), final_outputs(run)
    if data is None or outputs is None:
        return None
    key = json.dumps(data, sort_keys=True, default=str)
    if key not in cache:
        cache[key] = _test_records(data)
    if isinstance(cache[key], str):  # not readable on this machine
        return None
    source, records = cache[key]
    scenes = [r.meta.get("scene") for r in records]
    if len(records) != len(outputs) or any(s is None for s in scenes):
        return None
    return CAPTION_RATES[metric](outputs, scenes, getattr(source, "cooc", None))


def pooled_mcnemar(pairs: Sequence[tuple[Flags, Flags]]) -> dict[str, float]:
    """Exact McNemar over captions pooled across seeds: each (A flags, B flags) pair is one seed's
    test set, caption i of A paired with caption i of B. b = A flagged and B not, c = the reverse;
    captions not at risk (None) in either are skipped.

    Pooling treats the captions as independent: it ignores their clustering by seed (captions of
    one seed share a trained model), so its p is optimistic when seeds differ a lot; read it next
    to the per-seed tests."""
    b = c = 0
    for fa, fb in pairs:
        if len(fa) != len(fb):
            raise ValueError(
                f"McNemar pairs caption by caption: {len(fa)} flags for A, {len(fb)} for B"
            )
        for x, y in zip(fa, fb):
            if x is None or y is None:
                continue
            b += bool(x) and not y
            c += bool(y) and not x
    return {"b": b, "c": c, "p": mcnemar_exact(b, c)}


def row_mcnemar(
    runs_a: dict[float, Path],
    runs_b: dict[float, Path],
    seeds: Sequence[float],
    metric: str,
    cache: dict[str, Any],
) -> dict[str, float] | None:
    """`pooled_mcnemar` of A's and B's runs over `seeds` (seed → run dir), or None when `metric`
    has no per-caption flags or any seed's captions, scenes or shared test set are missing (a
    partial pool would not match the row's seeds)."""
    if metric not in CAPTION_RATES or not seeds:
        return None
    pairs = []
    for s in seeds:
        ra, rb = runs_a.get(s), runs_b.get(s)
        if ra is None or rb is None or eval_data(ra) != eval_data(rb):
            return None
        fa, fb = run_flags(ra, metric, cache), run_flags(rb, metric, cache)
        if fa is None or fb is None or len(fa) != len(fb):
            return None
        pairs.append((fa, fb))
    out = pooled_mcnemar(pairs)
    return None if math.isnan(out["p"]) else out
