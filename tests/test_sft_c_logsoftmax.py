"""SFT-C normalises its logits once: `SFTCModule.compute` takes one log-softmax over the
[B, T, V] logits (it used to take three: the log-probs, the positives' NLL, the negatives'
NLL) and gives what the three-pass computation gave, checked against that computation written
out literally and against a per-token Python loop."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from cwdpo.batch import IGNORE_INDEX, CaptionBatch, PairBatch
from cwdpo.losses.objectives import sft_c_loss
from cwdpo.losses.sequence import sequence_logps, smoothed_nll
from cwdpo.stages import SFTCModule


def _logits_labels(b: int, t: int = 6, v: int = 13, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(b, t, v, generator=g)).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    for i in range(b):  # ragged prompt prefixes and right padding
        labels[i, : 1 + i % 3] = IGNORE_INDEX
        if i % 2:
            labels[i, -1] = IGNORE_INDEX
    return logits, labels


def _module(logits, labels, **knobs) -> SFTCModule:
    fake = SimpleNamespace(aligned_logits=lambda inputs: (logits, labels))
    m = SFTCModule(None, optimizer=None, **knobs)
    m.backbone = fake  # only `aligned_logits` is read
    return m


def _three_pass(logits, labels, n, paired, lam, margin_c, eps, reduction, constraint):
    """The computation before: `sequence_logps` + `smoothed_nll` per term, each its own
    log-softmax over the full vocabulary."""
    lp = sequence_logps(logits, labels)
    pos = smoothed_nll(logits[:n], labels[:n], eps, reduction)
    neg = smoothed_nll(logits[n:], labels[n:], 0.0, reduction) if paired else None
    out = sft_c_loss(pos, neg, lam, margin_c, constraint)
    return out, lp


def _loop_nll(logits, labels, eps, reduction):
    """Per-token Python loop: (1 − ε)·(−log p(y)) − ε·mean_v log p(v), over response tokens."""
    out = []
    for row, lab in zip(logits.double(), labels.tolist()):
        total, count = 0.0, 0
        for t, y in enumerate(lab):
            if y == IGNORE_INDEX:
                continue
            z = row[t].tolist()
            lse = math.log(sum(math.exp(x) for x in z))
            logp = [x - lse for x in z]
            total += (1 - eps) * -logp[y] - eps * sum(logp) / len(logp)
            count += 1
        out.append(total / max(count, 1) if reduction == "mean" else total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "lam, margin_c, eps, reduction, constraint",
    [
        (1.0, 1.0, 0.1, "mean", "soft"),
        (0.5, 20.0, 0.0, "sum", "soft"),
        (1.0, 3.0, 0.2, "mean", "hard"),
        (0.0, 1.0, 0.1, "mean", "soft"),
    ],
)
def test_one_log_softmax_gives_the_three_pass_result(
    dtype, lam, margin_c, eps, reduction, constraint, monkeypatch
):
    n = 3
    logits, labels = _logits_labels(2 * n, dtype=dtype, seed=int(lam * 10) + len(reduction))
    knobs = dict(lam=lam, margin_c=margin_c, label_smoothing=eps, reduction=reduction)
    module = _module(logits, labels, constraint=constraint, **knobs)
    calls = []
    real = torch.log_softmax
    monkeypatch.setattr(torch, "log_softmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss, m = module.compute(PairBatch(inputs={}, n=n))
    assert len(calls) == 1  # one normalisation of the [B, T, V] logits
    monkeypatch.setattr(torch, "log_softmax", real)
    want, lp = _three_pass(logits, labels, n, True, lam, margin_c, eps, reduction, constraint)
    assert torch.allclose(loss, want.loss, rtol=1e-6, atol=1e-6)
    for key, ref in (("nll_pos", want.pos_nll), ("nll_neg", want.neg_nll)):
        assert torch.allclose(m[key], ref, rtol=1e-6, atol=1e-6), key
    assert torch.equal(m["penalty"], want.penalty) and torch.equal(m["violated"], want.violated)
    assert torch.allclose(m["ell_pos"], lp.mean[:n].mean(), rtol=1e-6, atol=1e-7)
    assert torch.allclose(m["ell_neg"], lp.mean[n:].mean(), rtol=1e-6, atol=1e-7)
    # and both agree with the per-token loop (float64 reference)
    pos = _loop_nll(logits[:n].float(), labels[:n], eps, reduction).mean()
    neg = _loop_nll(logits[n:].float(), labels[n:], 0.0, reduction).mean()
    assert float(m["nll_pos"]) == pytest.approx(float(pos), rel=1e-5)
    assert float(m["nll_neg"]) == pytest.approx(float(neg), rel=1e-5)


def test_without_negatives_it_is_smoothed_sft_with_the_same_gradient():
    logits, labels = _logits_labels(4, seed=3)
    logits.requires_grad_(True)
    module = _module(logits, labels, lam=1.0, label_smoothing=0.1)
    loss, m = module.compute(CaptionBatch(inputs={}, n=4))
    (g_new,) = torch.autograd.grad(loss, logits)
    old = smoothed_nll(logits, labels, 0.1, "mean").mean()
    (g_old,) = torch.autograd.grad(old, logits)
    assert torch.allclose(loss, old, rtol=1e-6) and torch.allclose(g_new, g_old, atol=1e-7)
    assert "nll_neg" not in m and float(m["penalty"]) == 0.0
