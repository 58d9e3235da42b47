"""Win-rate of two caption lists on a source's test records, with the pipeline's judge choice.

Model-free and light to import (torch and the judges load on the first call), so that the
report (re-judging saved captions) shares it with `cwdpo.run.evaluation`
without importing the model layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cwdpo.data.records import CaptionRecord, record_prompt
from cwdpo.data.sources import CaptionSource


def win_rate(
    source: CaptionSource,
    records: Sequence[CaptionRecord],
    a: Sequence[str],
    b: Sequence[str],
    judge: Any = None,
) -> dict[str, Any]:
    """Win-rate of outputs `a` over `b`: by `judge` if given (e.g. an HttpJudge), else
    ground-truth facts where the source knows them, else reference CIDEr."""
    import torch

    from cwdpo.metrics.winrate import ReferenceJudge, ScoreJudge, WinRate

    items = [
        {"references": r.references, "prompt": record_prompt(r, source.prompt), "record": r}
        for r in records
    ]
    out: dict[str, Any] = {}
    if judge is not None:
        out["winrate/judge"] = repr(judge)
    elif records and source.score(a[0], records[0]) is not None:
        judge = ScoreJudge(lambda text, item: source.score(text, item["record"]))
    else:
        judge = ReferenceJudge()
    metric = WinRate()
    metric.update(torch.tensor(judge(list(a), list(b), items), dtype=torch.float32))
    out.update({f"winrate/{k}": float(v) for k, v in metric.compute().items()})
    if hasattr(judge, "n_unparsed"):
        out["winrate/unparsed"] = int(judge.n_unparsed)
    return out
