"""Response truncation as a stated policy (`model.truncation`), never silent.

Why: `VLMBackbone.collate` used to cut responses to fit `max_length` without a word (issue 24):
with a prompt of 255 of 256 tokens, chosen and rejected both became their first token, the
turn end was dropped, and CW-DPO trained on two identical label rows. Every row is now measured
before training (`cwdpo.run.token_budget`); what still exceeds at collate time (a synthesized
negative longer than the preflight bound) is handled here, by the policy:

- `error` (the default): a `DataError` naming the row, its prompt and response token counts
  and `model.max_length`.
- `warn`: the response is cut to fit (never an image or prompt token), counted in
  `TruncationStats.cut_rows` (results.json: `token_budget.cut_in_batches`) and logged.
- `drop_pair`: `OverBudget` naming the rows; the training data module drops them (a pair as a
  whole) and counts them (`token_budget.dropped_in_batches`). Where rows cannot be dropped
  (evaluation, probes) it surfaces as the error it is.

A prompt (image tokens included) that leaves no room for one response token is an error under
every policy. Whatever the policy, two identical label rows never form a pair
(`check_pair_labels`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cwdpo.batch import IGNORE_INDEX
from cwdpo.errors import DataError, OverBudget

log = logging.getLogger(__name__)

POLICIES = ("error", "warn", "drop_pair")
_HOW = "raise model.max_length, or set model.truncation=warn (cut, counted) or drop_pair (dropped, counted)"


def check_policy(policy: str) -> str:
    """`policy` when it is one of `POLICIES`, else a one-line error naming the key."""
    if policy not in POLICIES:
        raise ValueError(f"model.truncation={policy!r}: expected one of {list(POLICIES)}")
    return policy


@dataclass
class TruncationStats:
    """Rows whose response `warn` cut at collate time (read per stage by cwdpo.run.results)."""

    cut_rows: int = 0


def fit_responses(
    prompt_lens: Sequence[int],
    responses: list[list[int]],
    max_length: int,
    policy: str,
    stats: TruncationStats,
    describe: Callable[[int], str],
) -> list[list[int]]:
    """`responses` (token ids, turn end included) that fit after their prompts under `policy`;
    `describe(i)` names row i in errors and warnings."""
    over = []
    for i, (p, r) in enumerate(zip(prompt_lens, responses)):
        if max_length - p < 1:
            raise DataError(
                f"{describe(i)}: the prompt has {p} tokens (image tokens included), more than "
                f"max_length={max_length} leaves room for: raise model.max_length"
            )
        if p + len(r) > max_length:
            over.append(i)
    if not over:
        return responses
    i = over[0]
    numbers = (
        f"{describe(i)}: prompt {prompt_lens[i]} + response {len(responses[i])} tokens "
        f"(turn end included) > model.max_length={max_length}"
        + (f" ({len(over)} rows of the batch)" if len(over) > 1 else "")
    )
    if policy == "error":
        raise DataError(f"{numbers}; {_HOW}")
    if policy == "drop_pair":
        raise OverBudget(f"{numbers}; model.truncation=drop_pair drops such rows", over)
    stats.cut_rows += len(over)
    log.warning(
        "model.truncation=warn: response cut to fit: %s (%d cut so far)", numbers, stats.cut_rows
    )
    return [r[: max_length - p] for p, r in zip(prompt_lens, responses)]


def check_pair_labels(labels: torch.Tensor, n: int, describe: Callable[[int], str]) -> None:
    """Rows i and n+i of a pair batch must not carry the same labels: a cut that leaves chosen
    and rejected identical trains a pair whose log-ratio difference is zero by construction."""
    for i in range(n):
        a, b = labels[i], labels[n + i]
        a, b = a[a != IGNORE_INDEX], b[b != IGNORE_INDEX]
        if a.shape == b.shape and torch.equal(a, b):
            raise DataError(
                f"{describe(i)}: chosen and rejected have identical label rows after truncation "
                f"({a.numel()} tokens); {_HOW.replace('warn (cut, counted) or ', '')}"
            )


def pad_rows(
    prompt_ids: list[list[int]],
    responses: list[list[int]],
    per_token: dict[str, list[list[int]]],
    pad_id: int,
    fills: dict[str, int],
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids` / `attention_mask` / `labels` (IGNORE_INDEX except on the
    response) of prompt + response rows, and the per-token inputs extended over the response
    with `fills[key]`."""
    rows = [p + r for p, r in zip(prompt_ids, responses)]
    n, width = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, responses)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attention[i, : len(p) + len(r)] = 1
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
    out = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    for k, vals in per_token.items():
        t = torch.full((n, width), fills[k], dtype=torch.long)
        for i, v in enumerate(vals):
            t[i, : len(v)] = torch.tensor(v)
        out[k] = t
    return out
