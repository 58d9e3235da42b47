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

    def rows(self, sl: slice) -> SeqLogps:
        """The same quantities for rows `sl` (e.g. the positives of a pair batch)."""
        return SeqLogps(self.sum[sl], self.mean[sl], self.count[sl], self.token[sl], self.mask[sl])


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
    seq, vocab_mean = logps_with_vocab_mean(logits, labels, ignore_index)
    return nll_of(seq, vocab_mean, label_smoothing, reduction)


def logps_with_vocab_mean(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[SeqLogps, torch.Tensor]:
    """`sequence_logps` and, from the same one log-softmax, the per-position mean of log π over
    the vocabulary (0 where masked): all that `nll_of` needs for any ε and reduction, so SFT-C
    normalises its [B, T, V] logits once instead of once per term."""
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    logp = torch.log_softmax(logits.float(), dim=-1)  # float32, as `token_logps`
    tok = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * mask
    count = mask.sum(-1)
    total = tok.sum(-1)
    seq = SeqLogps(sum=total, mean=total / count.clamp(min=1), count=count, token=tok, mask=mask)
    return seq, logp.mean(-1) * mask


def nll_of(
    seq: SeqLogps,
    vocab_mean: torch.Tensor,
    label_smoothing: float = 0.0,
    reduction: Literal["sum", "mean"] = "sum",
) -> torch.Tensor:
    """Per-sequence (label-smoothed) NLL of rows of `logps_with_vocab_mean`'s output:
    Σ_t (1 − ε)·(−log π(y_t)) − ε·mean_v log π(v), summed or averaged over response tokens."""
    nll = -seq.token
    if label_smoothing > 0:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * vocab_mean
    per_seq = (nll * seq.mask).sum(-1)
    if reduction == "mean":
        per_seq = per_seq / seq.mask.sum(-1).clamp(min=1)
    elif reduction != "sum":
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return per_seq
