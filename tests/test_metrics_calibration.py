"""TokenCalibration / PreferenceCalibration against brute-force numpy and torchmetrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from cwdpo.metrics import PreferenceCalibration, TokenCalibration


def brute_force_ece(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    """Textbook L1 ECE: bins [k/n, (k+1)/n), the last one closed at 1."""
    total = 0.0
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        in_bin = (conf >= lo) & ((conf < hi) if k < n_bins - 1 else (conf <= hi))
        if in_bin.any():
            total += in_bin.sum() / conf.size * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return total


def make_batch(seed: int = 0, b: int = 4, t: int = 9, v: int = 13):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * torch.rand(b, t, 1, generator=g) * 4
    labels = torch.randint(0, v, (b, t), generator=g)
    hit = torch.rand(b, t, generator=g) < 0.5  # make about half the labels the argmax
    labels = torch.where(hit, logits.argmax(-1), labels)
    labels[0, :3] = -100
    labels[2, -4:] = -100
    return logits, labels


def reference_stats(logits, labels):
    mask = labels != -100
    probs = torch.softmax(logits[mask].float(), -1)
    conf, pred = probs.max(-1)
    correct = (pred == labels[mask]).numpy().astype(np.float64)
    p64 = torch.softmax(logits[mask].double(), -1).numpy()
    entropy = float(np.mean(-(p64 * np.log(p64)).sum(-1)))
    return conf.numpy().astype(np.float64), correct, entropy, probs


@pytest.mark.parametrize("n_bins", [15, 10])
def test_token_calibration_against_brute_force_and_torchmetrics(n_bins):
    logits, labels = make_batch()
    metric = TokenCalibration(n_bins=n_bins)
    metric.update(logits[:2], labels[:2])
    metric.update(logits[2:], labels[2:])
    out = metric.compute()
    conf, correct, entropy, _ = reference_stats(logits, labels)
    assert out["n_tokens"] == int((labels != -100).sum()) == conf.size
    assert out["ece"] == pytest.approx(brute_force_ece(conf, correct, n_bins), abs=1e-6)
    assert out["accuracy"] == pytest.approx(correct.mean())
    assert out["mean_top1_prob"] == pytest.approx(conf.mean(), rel=1e-6)
    assert out["entropy"] == pytest.approx(entropy, rel=1e-5)
    tm = multiclass_calibration_error(
        logits.reshape(-1, logits.shape[-1]).softmax(-1),
        labels.reshape(-1),
        num_classes=logits.shape[-1],
        n_bins=n_bins,
        norm="l1",
        ignore_index=-100,
    )
    assert out["ece"] == pytest.approx(float(tm), abs=1e-6)


def test_ignore_index_chunking_and_merge():
    logits, labels = make_batch(seed=1)
    full = TokenCalibration(chunk_rows=5)
    full.update(logits, labels)
    expected = full.compute()
    # garbage logits at ignored positions change nothing
    noisy = logits.clone()
    noisy[labels == -100] = torch.randn_like(noisy[labels == -100]) * 100
    other = TokenCalibration()
    other.update(noisy, labels)
    got = other.compute()
    assert got == pytest.approx(expected, rel=1e-6)
    # split across two "ranks", merged like the DDP sum reduction
    a, b = TokenCalibration(), TokenCalibration()
    a.update(logits[:1], labels[:1])
    b.update(logits[1:], labels[1:])
    a.merge_state(b)
    assert a.compute() == pytest.approx(expected, rel=1e-6)
    # custom ignore index; an all-ignored batch is a no-op
    custom = TokenCalibration(ignore_index=-1)
    custom.update(logits, labels.masked_fill(labels == -100, -1))
    custom.update(logits, torch.full_like(labels, -1))
    assert custom.compute() == pytest.approx(expected, rel=1e-6)


def test_token_calibration_edge_cases():
    metric = TokenCalibration()
    with pytest.raises(ValueError, match="no data"):
        metric.compute()
    with pytest.raises(ValueError, match="leading shape"):
        metric.update(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    # certain and right: confidence exactly 1.0 lands in the last bin, ECE 0, entropy 0
    logits = torch.full((1, 4, 6), -1e4)
    logits[..., 2] = 1e4
    metric.update(logits, torch.full((1, 4), 2))
    out = metric.compute()
    assert out["ece"] == 0.0 and out["accuracy"] == 1.0 and out["mean_top1_prob"] == 1.0
    assert out["entropy"] == pytest.approx(0.0, abs=1e-12)
    # bf16 logits are accepted (softmax runs in float32)
    bf = TokenCalibration()
    bf.update(torch.randn(2, 3, 7).bfloat16(), torch.randint(0, 7, (2, 3)))
    assert 0.0 <= bf.compute()["ece"] <= 1.0


def test_preference_calibration():
    g = torch.Generator().manual_seed(0)
    margins = torch.randn(500, generator=g) * 3 + 0.5
    metric = PreferenceCalibration()
    metric.update(margins[:200], beta=0.1)
    metric.update(margins[200:], beta=0.5)  # beta may change between updates
    out = metric.compute()
    p = torch.cat([torch.sigmoid(0.1 * margins[:200]), torch.sigmoid(0.5 * margins[200:])])
    conf = torch.maximum(p, 1 - p).double().numpy()
    correct = (margins > 0).double().numpy()  # strict, as TRL's rewards/accuracies
    assert out["n"] == 500
    assert out["accuracy"] == pytest.approx(float((margins > 0).double().mean()))
    assert out["ece"] == pytest.approx(brute_force_ece(conf, correct, 15), abs=1e-6)
    assert out["mean_confidence"] == pytest.approx(conf.mean(), rel=1e-6)
    assert out["mean_p_chosen"] == pytest.approx(float(p.double().mean()), rel=1e-6)
    # same thing as torchmetrics' 2-class calibration error with the chosen class as the label
    tm = multiclass_calibration_error(
        torch.stack([1 - p, p], dim=1), torch.ones(500, dtype=torch.long), num_classes=2, n_bins=15
    )
    assert out["ece"] == pytest.approx(float(tm), abs=1e-6)
    with pytest.raises(ValueError, match="no data"):
        PreferenceCalibration().compute()


def test_preference_accuracy_is_strict_like_trl():
    """A zero margin is not a correct preference (TRL: chosen_rewards > rejected_rewards), and a
    tiny positive one is, even where sigmoid(beta * margin) rounds to exactly 0.5 in float32."""
    chosen = torch.tensor([0.3, -0.2, 0.1, 0.5, 0.7, 1e-8])  # policy - reference log-ratios
    rejected = torch.tensor([0.1, -0.2, 0.4, 0.5, -0.1, 0.0])
    beta = 0.1
    metric = PreferenceCalibration()
    metric.update(chosen - rejected, beta=beta)
    out = metric.compute()
    # TRL 1.16 DPOTrainer: reward_accuracies = (beta * chosen_lr > beta * rejected_lr).float()
    trl_accuracy = float((beta * chosen > beta * rejected).float().mean())
    assert out["accuracy"] == pytest.approx(trl_accuracy) == pytest.approx(3 / 6)
    assert float(torch.sigmoid(beta * torch.tensor(1e-8))) == 0.5  # why p >= 0.5 cannot decide
    # the zero margins sit at confidence 0.5 and count as wrong: ECE by hand over 15 bins
    p = torch.sigmoid(beta * (chosen - rejected))
    conf = torch.maximum(p, 1 - p).double().numpy()
    correct = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    assert out["ece"] == pytest.approx(brute_force_ece(conf, correct, 15), abs=1e-9)
