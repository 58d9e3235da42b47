"""Response log-probs from logits, as pure tensor functions: per-token log π(y_t | ·) with
labels already aligned, their per-sequence sum / mean ℓ̄ / count (`SeqLogps`), and the
(label-smoothed) per-sequence NLL stage 1 trains on. `cwdpo.losses.objectives` builds on these
(and re-exports them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from cwdpo.batch import IGNORE_INDEX


@dataclass
class SeqLogps:
    """Per-sequence log-probabilities of the response tokens."""

    sum: torch.Tensor  # [B] log π(y|x)
    mean: torch.Tensor  # [B] ℓ̄ (average token log-prob)
    count: torch.Tensor  # [B] number of response tokens L
    token: torch.Tensor  # [B, T] per-token log-probs (0 where masked)
    mask: torch.Tensor  # [B, T] bool, True on response tokens


def token_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(label_t | ·) for every position, with labels *already aligned* to logits.

    Callers shift once (logits[:, :-1] vs labels[:, 1:]); keeping the shift out of here lets
    prefix-shared forwards hand over only the response slice. Returns (logps, mask).
    """
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    # log_softmax in float32: bf16 logits lose ~2 digits in the normaliser.
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> SeqLogps:
    """Sequence sum, per-token mean ℓ̄ and token count from aligned logits/labels."""
    tok, mask = token_logps(logits, labels, ignore_index)
    count = mask.sum(-1)
    total = tok.sum(-1)
    mean = total / count.clamp(min=1)
    return SeqLogps(sum=total, mean=mean, count=count, token=tok, mask=mask)


def smoothed_nll(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    reduction: Literal["sum", "mean"] = "sum",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-sequence NLL with optional label smoothing ε (uniform over the vocabulary).

    ε = 0 gives exactly −log π(y|x) (sum) or −ℓ̄ (mean). Smoothing is the "gentle" form of
    supervision: the target keeps ε mass off the top-1 token, which curbs overconfidence.
    """
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    if label_smoothing > 0:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    per_seq = (nll * mask).sum(-1)
    if reduction == "mean":
        per_seq = per_seq / mask.sum(-1).clamp(min=1)
    elif reduction != "sum":
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return per_seq
