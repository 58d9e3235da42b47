"""`negatives=self_judged`: the pair of one record from the policy's own candidate captions.

Best vs worst by the source's judge (ShapesWorld: the verifier against the truth), or, with
`pair_rule=companion_edit` on the testbed's trigger images, the best candidate and its
one-phrase companion edit (`cwdpo.data.companion_pairs`).
"""

from __future__ import annotations

from typing import Any

from cwdpo.data.companion_pairs import companion_pair
from cwdpo.data.negative_config import NegativeConfig
from cwdpo.data.records import CaptionRecord, DataError


def check_pair_rule(source: Any, neg: NegativeConfig) -> None:
    """`companion_edit` needs a planted co-occurrence to edit: fail before any sampling."""
    if neg.pair_rule == "companion_edit" and getattr(source, "cooc", None) is None:
        raise DataError(
            "negatives.pair_rule=companion_edit needs a source with a planted co-occurrence "
            "(data=shapes_cooc: world.cooc_trigger / cooc_companion); "
            f"{type(source).__name__} has none"
        )


def judge_samples(
    source: Any, neg: NegativeConfig, samples: list[str], rec: CaptionRecord
) -> tuple[list[str], str]:
    """([best, worst] by the source's judge when the gap is ≥ `neg.min_gap`, else [best] (or
    []), "self:worst"); with `pair_rule=companion_edit`, on a trigger image, ([chosen,
    rejected], "self:companion:<edit>:<absent|present>") from the best candidate."""
    scored = [(source.score(t, rec), t) for t in samples]
    if any(sc is None for sc, _ in scored):
        raise DataError(
            "negatives=self_judged needs a source whose score() judges captions "
            f"(ShapesWorld); {type(source).__name__} returns None"
        )
    if not scored:
        return [], "self:worst"
    best = max(scored, key=lambda x: x[0])  # first of the ties: deterministic
    worst = min(scored, key=lambda x: x[0])
    if neg.pair_rule == "companion_edit":
        trigger, companion = source.cooc
        pair = companion_pair(
            best[1], rec.meta["scene"], trigger, companion, source.world.positions
        )
        if pair is not None:
            return [pair[0], pair[1]], f"self:companion:{pair[2]}"
    if best[0] - worst[0] >= neg.min_gap:
        return [best[1], worst[1]], "self:worst"
    return [best[1]], "self:worst"
