"""Dynamics diagnostics: distribution measures, the gradient split, the per-step monitor, W&B.

The gradient split must add up to the gradient the optimizer sees (checked on a toy model, on
the tiny VLM through `CWDPOModule.compute`, and live inside a Trainer run), and a W&B offline
run must hold the stage-prefixed keys.
"""

from __future__ import annotations

import csv
import math
from functools import partial

import lightning as L
import numpy as np
import pytest
import torch

from cwdpo.losses.diagnostics import (
    coarsen,
    distribution_stats,
    entropy,
    gradient_split,
    group_stats,
    js_divergence,
    support,
    top1_prob,
    tv_distance,
    vulnerable_fraction,
)
from cwdpo.losses.objectives import cw_dpo_loss
from tests.helpers import cpu_trainer


# ---------------------------------------------------------------- pure functions
def test_distribution_measures_match_numpy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g)
    other = torch.randn(5, 7, generator=g)
    logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(other, -1)
    p, q = logp.exp().numpy().astype(np.float64), logq.exp().numpy().astype(np.float64)
    np.testing.assert_allclose(entropy(logp).numpy(), -(p * np.log(p)).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(top1_prob(logp).numpy(), p.max(-1), rtol=1e-6)
    np.testing.assert_allclose(
        tv_distance(logp.exp(), logq.exp()).numpy(), 0.5 * np.abs(p - q).sum(-1), rtol=1e-5
    )
    m = 0.5 * (p + q)
    js = 0.5 * (p * np.log(p / m)).sum(-1) + 0.5 * (q * np.log(q / m)).sum(-1)
    np.testing.assert_allclose(js_divergence(logp.exp(), logq.exp()).numpy(), js, rtol=1e-4)


def test_divergence_extremes():
    a = torch.tensor([[1.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.5, 0.5]])
    assert tv_distance(a, a).item() == 0.0 and js_divergence(a, a).item() == 0.0
    assert tv_distance(a, b).item() == pytest.approx(1.0)
    assert js_divergence(a, b).item() == pytest.approx(math.log(2), rel=1e-6)


def test_coarsening_is_exact_on_full_support_and_a_lower_bound_otherwise():
    g = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(3 * torch.randn(20, 50, generator=g), -1)
    logq = torch.log_softmax(3 * torch.randn(20, 50, generator=g), -1)
    full = distribution_stats(logq, coarsen(logp.exp(), None), None)
    assert support(logp, 50) is None and support(logp, None) is None
    idx = support(logp, 5)
    assert idx.shape == (20, 5)
    coarse = distribution_stats(logq, coarsen(logp.exp(), idx), idx)
    assert coarsen(logp.exp(), idx).sum(-1).allclose(torch.ones(20), atol=1e-5)
    assert coarse["tv"] <= full["tv"] + 1e-6 and coarse["js"] <= full["js"] + 1e-6
    assert coarse["entropy"] == full["entropy"] and coarse["top1"] == full["top1"]
    assert distribution_stats(logp, coarsen(logp.exp(), idx), idx)["tv"] == pytest.approx(
        0, abs=1e-6
    )


def test_vulnerable_fraction_and_group_stats():
    beta = 0.5
    # a = σ(β·x) for x chosen to land at a = 0.5, 0.85, 0.95, 0.995
    a = torch.tensor([0.5, 0.85, 0.95, 0.995])
    x = torch.log(a / (1 - a)) / beta
    assert vulnerable_fraction(x, beta).item() == pytest.approx(0.5)
    assert vulnerable_fraction(x, beta, (0.4, 1.0)).item() == pytest.approx(1.0)
    v = torch.tensor([3.0, -1.0, 0.5, 2.0, 7.0])
    s = group_stats(v, (0.1, 0.5, 0.9))
    assert s["mean"] == pytest.approx(v.mean().item())
    for q in (10, 50, 90):
        assert s[f"q{q}"] == pytest.approx(float(np.quantile(v.numpy(), q / 100)))


# ---------------------------------------------------------------- gradient split
def _toy_pairs(seed: int = 0, n: int = 3, t: int = 4, v: int = 6):
    """A toy 'policy': per-token log-probs of fixed labels from a linear layer over features."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, v))
    feats = torch.randn(2 * n, t, 5, generator=g)
    labels = torch.randint(0, v, (2 * n, t), generator=g)
    return model, feats, labels


def _toy_loss(model, feats, labels, n, cooling=True):
    token = torch.log_softmax(model(feats), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    seq, mean = token.sum(-1), token.mean(-1)
    ref = seq.detach() - 0.3
    out = cw_dpo_loss(
        seq[:n], seq[n:], ref[:n], ref[n:], mean[n:], beta=0.5, cooling=cooling, floor=-1.5, tau=0.5
    )
    return out.loss + 0.2 * (-mean[:n]).mean(), token  # RPO-style extra term on the chosen


@pytest.mark.parametrize("cooling", [True, False])
def test_gradient_split_sums_to_the_full_gradient(cooling):
    torch.manual_seed(0)
    model, feats, labels = _toy_pairs()
    params = list(model.parameters())
    loss, token = _toy_loss(model, feats, labels, 3, cooling)
    split = gradient_split(loss, [token], params, 3, return_grads=True)
    full = torch.autograd.grad(loss, params)
    for gw, gl, g in zip(split.grads_w, split.grads_l, full):
        torch.testing.assert_close(gw + gl, g, rtol=1e-5, atol=1e-7)
    flat_w = torch.cat([x.flatten() for x in split.grads_w])
    flat_l = torch.cat([x.flatten() for x in split.grads_l])
    assert split.norm_w == pytest.approx(flat_w.norm().item(), rel=1e-5)
    assert split.norm_l == pytest.approx(flat_l.norm().item(), rel=1e-5)
    assert split.norm_total == pytest.approx((flat_w + flat_l).norm().item(), rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(flat_w, flat_l, dim=0).item()
    assert split.cosine == pytest.approx(cos, rel=1e-4, abs=1e-6)
    assert split.norm_w > 0 and split.norm_l > 0


def test_gradient_split_on_the_tiny_vlm(backbone, pair_batch):
    """Through the real stage module: one forward, split vs `loss.backward()` gradients."""
    from cwdpo.batch import PairBatch
    from cwdpo.stages import CWDPOModule

    backbone.snapshot_reference()
    module = CWDPOModule(backbone, optimizer=partial(torch.optim.SGD, lr=0.1), beta=0.1, floor=-6.0)
    n = len(pair_batch)
    enc = backbone.collate_pairs(
        pair_batch.images, pair_batch.prompts, pair_batch.chosen, pair_batch.rejected
    )
    res, pol = module.forward_loss(PairBatch(inputs=enc, n=n))
    loss = res.loss
    params = [p for p in backbone.model.parameters() if p.requires_grad]
    split = gradient_split(loss, [pol.token], params, n, return_grads=True)
    loss.backward()
    num = den = 0.0
    for p, a, b in zip(params, split.grads_w, split.grads_l):
        zero = torch.zeros_like(p)
        g = p.grad if p.grad is not None else zero  # unused parameters (e.g. CLIP's last layer)
        mine = (a if a is not None else zero) + (b if b is not None else zero)
        num += float((mine - g).double().pow(2).sum())
        den += float(g.double().pow(2).sum())
    assert den > 0
    assert math.sqrt(num / den) < 1e-4
    assert split.norm_l > 0 and split.norm_w > 0


# ---------------------------------------------------------------- the monitor + W&B, live
def _cw_dpo_trainer(backbone, root, steps, callbacks, loggers):
    from cwdpo.data.datamodules import NegativeConfig, PreferenceDataModule
    from cwdpo.data.sources import ShapesSource
    from cwdpo.stages import CWDPOModule

    src = ShapesSource(sizes={"train": 16, "val": 4, "test": 4, "probe": 6})
    dm = PreferenceDataModule(
        src,
        src.captions("train"),
        batch_size=4,
        seed=0,
        negatives=NegativeConfig(easy_fraction=0.5),
        collate=backbone.collate,
        collate_pairs=backbone.collate_pairs,
    )
    backbone.snapshot_reference()
    module = CWDPOModule(
        backbone,
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        total_steps=steps,
        beta=0.1,
        floor=-6.0,
        tau=1.0,
    )
    trainer = cpu_trainer(root, steps, callbacks, logger=loggers, log_every_n_steps=1)
    return trainer, module, dm


class _LastOutputs(L.Callback):
    """What `training_step` handed the callbacks at the last batch."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs = outputs


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_monitor_and_wandb_offline_run(backbone, tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    from cwdpo.callbacks.dynamics import DynamicsMonitor
    from cwdpo.callbacks.probes import DeltaLogpProbe
    from cwdpo.callbacks.wandb_logger import (
        StageWandbLogger,
        finish_run,
        offline_run_dirs,
        read_offline_run,
    )

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    steps = 3
    dyn = DynamicsMonitor(grad_split_every_n_steps=2, histogram_every_n_steps=1)
    probe = DeltaLogpProbe(
        every_n_steps=2, n_items=4, batch_size=4, n_samples=2, sample_max_new_tokens=6
    )
    wb = StageWandbLogger(project="cwdpo-test", name="t", save_dir=str(tmp_path), mode="online")
    loggers = [CSVLogger(str(tmp_path), name="csv", version="cw_dpo"), wb]
    for obj in (dyn, probe, wb):
        obj.set_stage("cw_dpo", tmp_path, first=True)
    last = _LastOutputs()
    trainer, module, dm = _cw_dpo_trainer(backbone, tmp_path, steps, [probe, dyn, last], loggers)
    trainer.fit(module, datamodule=dm)
    finish_run(tmp_path, {"stages": {"cw_dpo": {"steps": steps}}})

    # the split adds up to the optimizer's gradient, at the sampled steps only
    assert [s["step"] for s in dyn.splits] == [0, 2]
    assert all(s["gradsplit/residual"] < 1e-4 for s in dyn.splits)
    rows = _rows(tmp_path / "dynamics.csv")
    metrics = {r["metric"] for r in rows}
    assert {
        "dynamics/cooling/mean",
        "dynamics/vulnerable_frac",
        "gradsplit/norm_w",
        "gradsplit/norm_l",
        "gradsplit/cosine",
        "gradsplit/residual",
    } <= metrics
    vul = [float(r["value"]) for r in rows if r["metric"] == "dynamics/vulnerable_frac"]
    assert len(vul) == steps and all(0.0 <= v <= 1.0 for v in vul)
    w = _rows(tmp_path / "cooling_weights.csv")
    assert len(w) == 4 * steps and all(0.0 <= float(r["w"]) <= 1.0 for r in w)
    # the per-step weights are the module's own cooling weights
    np.testing.assert_allclose(
        [float(r["w"]) for r in w if r["step"] == str(steps - 1)],
        last.outputs["terms"].weights.numpy(),
        rtol=1e-6,
    )
    assert module.step_in_flight is None  # nothing of the step is left on the module

    # CSV logger always on
    csv_keys = set(_rows(tmp_path / "csv" / "cw_dpo" / "metrics.csv")[0])
    assert {"gradsplit/norm_l", "probe/positives/mean", "dynamics/vulnerable_frac"} <= csv_keys

    # W&B: offline (mode "online" without an API key falls back), stage-prefixed keys
    runs = offline_run_dirs(tmp_path)
    assert len(runs) == 1 and runs[0].name.startswith("offline-run-")
    data = read_offline_run(runs[0])
    assert data["complete"]  # the exit record is written
    keys = set().union(*data["history"])
    for k in (
        "cw_dpo/step",
        "cw_dpo/train/loss",
        "cw_dpo/dynamics/vulnerable_frac",
        "cw_dpo/dynamics/cooling/mean",
        "cw_dpo/gradsplit/norm_w",
        "cw_dpo/gradsplit/norm_l",
        "cw_dpo/gradsplit/cosine",
        "cw_dpo/probe/positives/mean",
        "cw_dpo/probe/easy/q10",
        "cw_dpo/probe/positives/tv",
        "cw_dpo/probe/positives/top1",
    ):
        assert k in keys, k
    hist = [h for h in data["history"] if "cw_dpo/dynamics/cooling_weights/_type" in h]
    assert hist and hist[0]["cw_dpo/dynamics/cooling_weights/_type"] == "histogram"
    assert sum(hist[0]["cw_dpo/dynamics/cooling_weights/values"]) == 4  # one batch of w_c
    assert any(k.startswith("cw_dpo/samples/captions") for k in keys), sorted(keys)  # table
    assert any(k.startswith("cw_dpo/probe/delta_logp") for k in keys)  # line series
    assert any(k.startswith("run/probe/delta_logp") for k in keys)
    assert data["summary"]["stages/cw_dpo/steps"] == steps
    assert list((runs[0] / "files" / "media" / "table").rglob("*.table.json"))
