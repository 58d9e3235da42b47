"""Calibration diagnostics: token-level ECE/entropy/top-1 prob and preference-level ECE.

Why: the CW-DPO paper's argument is that DPO's misdirected loser gradient squeezes probability
mass onto the top-1 token, making the policy overconfident (token ECE 0.12 -> 0.25 under DPO,
0.08-0.10 under CW-DPO) and lowering predictive entropy. :class:`TokenCalibration` measures exactly
that on response tokens; :class:`PreferenceCalibration` asks whether the implicit reward's
confidence ``sigma(beta * margin)`` that the chosen response is preferred is itself calibrated.

Both keep only per-bin sums (count, summed confidence, summed correctness) as ``sum`` states, so
memory is O(n_bins) and DDP sync is an exact all-reduce. Binning follows torchmetrics'
``*_calibration_error`` (equal-width bins, ``torch.bucketize(conf, linspace(0, 1, n_bins + 1),
right=True) - 1``) except that a confidence of exactly 1.0 goes to the last bin instead of an extra
one, i.e. this is standard L1 ECE = sum_b (n_b / N) |acc_b - conf_b|.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["PreferenceCalibration", "TokenCalibration", "binned_sums", "ece_from_bins"]


def binned_sums(confidences: Tensor, correct: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin (count, sum of confidence, sum of correctness) in float64 for equal-width bins."""
    conf = confidences.detach().flatten().to(torch.float64)
    corr = correct.detach().flatten().to(torch.float64)
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=confidences.dtype, device=conf.device)
    # bucketize on the original dtype, like torchmetrics, so bin edges agree bit for bit
    idx = torch.bucketize(confidences.detach().flatten(), boundaries, right=True) - 1
    idx = idx.clamp_(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64, device=conf.device)
    conf_sum = torch.zeros_like(count)
    corr_sum = torch.zeros_like(count)
    count.index_add_(0, idx, torch.ones_like(conf))
    conf_sum.index_add_(0, idx, conf)
    corr_sum.index_add_(0, idx, corr)
    return count, conf_sum, corr_sum


def ece_from_bins(count: Tensor, conf_sum: Tensor, corr_sum: Tensor) -> float:
    """L1 expected calibration error ``sum_b n_b / N * |acc_b - conf_b|`` from per-bin sums."""
    total = count.sum()
    if total <= 0:
        return float("nan")
    # n_b/N * |corr_b/n_b - conf_b/n_b| == |corr_b - conf_b| / N (empty bins contribute 0)
    return float((corr_sum - conf_sum).abs().sum() / total)


class _BinnedCalibration(Metric):
    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, n_bins: int = 15, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
        self.n_bins = n_bins
        for name in ("bin_count", "bin_conf", "bin_correct"):
            self.add_state(
                name, default=torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum"
            )

    def _add(self, confidences: Tensor, correct: Tensor) -> None:
        count, conf_sum, corr_sum = binned_sums(confidences, correct, self.n_bins)
        self.bin_count += count.to(self.bin_count.device)
        self.bin_conf += conf_sum.to(self.bin_conf.device)
        self.bin_correct += corr_sum.to(self.bin_correct.device)

    def _basic(self, what: str) -> dict[str, float]:
        n = float(self.bin_count.sum())
        if n == 0:
            raise ValueError(f"{type(self).__name__}.compute() has no data: no {what} were added")
        return {
            "ece": ece_from_bins(self.bin_count, self.bin_conf, self.bin_correct),
            "accuracy": float(self.bin_correct.sum()) / n,
            "mean_confidence": float(self.bin_conf.sum()) / n,
        }


class TokenCalibration(_BinnedCalibration):
    """Next-token calibration on response tokens: ECE, accuracy, mean top-1 prob, entropy.

    ``update(logits[B, T, V], labels[B, T])`` expects labels already aligned with logits
    (``logits[:, t]`` predicts ``labels[:, t]``; the caller shifts) and skips ``ignore_index``.
    Confidence is the top-1 softmax probability, correct means top-1 == label. ``compute()``
    returns ``ece`` (``n_bins`` equal-width bins), ``accuracy``, ``mean_top1_prob``, ``entropy``
    (mean predictive entropy, nats) and ``n_tokens``. Softmax runs in float32 on ``chunk_rows``
    valid positions at a time, so a 150k vocabulary does not need a second full-size copy.
    """

    def __init__(
        self, n_bins: int = 15, ignore_index: int = -100, chunk_rows: int = 1024, **kwargs: Any
    ) -> None:
        super().__init__(n_bins=n_bins, **kwargs)
        self.ignore_index = ignore_index
        self.chunk_rows = chunk_rows
        self.add_state(
            "entropy_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, logits: Tensor, labels: Tensor) -> None:
        """Accumulate calibration statistics of ``logits`` [B, T, V] against ``labels`` [B, T]."""
        if logits.ndim < 2 or logits.shape[:-1] != labels.shape:
            raise ValueError(
                f"logits must be [..., V] with leading shape equal to labels; got "
                f"{tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        logits = logits.detach()
        mask = labels != self.ignore_index
        rows = logits[mask]  # [N, V]
        targets = labels[mask]
        if rows.numel() == 0:
            return
        if bool(((targets < 0) | (targets >= logits.shape[-1])).any()):
            raise ValueError("labels outside [0, vocab) that are not ignore_index")
        confs, corrects = [], []
        entropy = torch.zeros((), dtype=torch.float64, device=rows.device)
        for start in range(0, rows.shape[0], self.chunk_rows):
            probs = torch.softmax(rows[start : start + self.chunk_rows].float(), dim=-1)
            conf, pred = probs.max(dim=-1)
            confs.append(conf)
            corrects.append(pred == targets[start : start + self.chunk_rows])
            entropy += torch.special.entr(probs).sum(dim=-1).double().sum()
        self._add(torch.cat(confs), torch.cat(corrects))
        self.entropy_sum += entropy.to(self.entropy_sum.device)

    def compute(self) -> dict[str, float]:
        """ECE, accuracy, mean top-1 probability, mean entropy (nats) and token count."""
        base = self._basic("tokens")
        n = float(self.bin_count.sum())
        return {
            "ece": base["ece"],
            "accuracy": base["accuracy"],
            "mean_top1_prob": base["mean_confidence"],
            "entropy": float(self.entropy_sum) / n,
            "n_tokens": int(round(n)),
        }


class PreferenceCalibration(_BinnedCalibration):
    """Calibration of the implicit-reward preference ``p = sigmoid(beta * margin)``.

    ``margin`` = (policy - reference log-ratio of chosen) - (that of rejected). The prediction
    has confidence ``max(p, 1 - p)`` and is correct exactly when ``margin > 0`` (the chosen
    response is the label): strict, as TRL's ``rewards/accuracies`` (``chosen_rewards >
    rejected_rewards``), so a zero margin (policy = reference) is not a correct preference, and
    decided on the margin, not on ``p``, which rounds to 0.5 in float32 for tiny margins.
    ``compute()`` returns ``ece``, ``accuracy`` (= reward accuracy), ``mean_confidence``,
    ``mean_p_chosen`` and ``n``. ``beta`` (> 0) may change between updates (e.g. a schedule).
    """

    def __init__(self, n_bins: int = 15, **kwargs: Any) -> None:
        super().__init__(n_bins=n_bins, **kwargs)
        self.add_state(
            "p_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, margins: Tensor, beta: float | Tensor) -> None:
        """Add preference margins (any shape) scored with temperature ``beta``."""
        scale = torch.as_tensor(beta, dtype=torch.float32, device=margins.device)
        scaled = (scale * margins.detach().float()).flatten()
        if scaled.numel() == 0:
            return
        p = torch.sigmoid(scaled)
        self._add(torch.maximum(p, 1 - p), scaled > 0)
        self.p_sum += p.double().sum().to(self.p_sum.device)

    def compute(self) -> dict[str, float]:
        """ECE, accuracy, mean confidence, mean ``p(chosen)`` and count."""
        base = self._basic("margins")
        n = float(self.bin_count.sum())
        return {**base, "mean_p_chosen": float(self.p_sum) / n, "n": int(round(n))}
