"""Δlogp probes: numbers equal a direct recomputation; rules fire on constructed trajectories
(and not on healthy ones); early stopping and the curriculum hook act on a live Trainer."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cwdpo.callbacks.probes import (
    DeltaLogpProbe,
    ProbeRule,
    describe_firing,
    parse_rules,
    probe_records,
    probe_texts,
    rule_fires,
)
from cwdpo.data.sources import ShapesSource
from cwdpo.losses.diagnostics import tv_distance
from tests.helpers import cpu_trainer, shapes_sft

STEPS = [0, 20, 40, 60, 80, 100]


# ---------------------------------------------------------------- rules on trajectories
def test_displacement_fires_on_a_falling_positive_trajectory_only():
    rule = ProbeRule("displacement", "drop_from_best", group="positives", threshold=0.5, patience=2)
    displaced = [0.0, 0.3, 0.7, 0.1, 0.05, -0.2]  # rises, then falls > 0.5 below its best
    healthy = [0.0, 0.3, 0.5, 0.6, 0.55, 0.62]  # small wiggles only
    fired = [i for i in range(1, 7) if rule_fires(rule, STEPS[:i], displaced[:i])]
    assert fired == [5, 6]  # needs two consecutive probes (patience=2): 0.6 then 0.65 drops
    assert not any(rule_fires(rule, STEPS[:i], healthy[:i]) for i in range(1, 7))
    assert "fell 0.650 from its best 0.700" in describe_firing(rule, STEPS[:5], displaced[:5])


def test_squeezing_floor_patience_and_warmup():
    rule = ProbeRule("squeezing", "below", group="easy", threshold=-6.0, patience=2, min_step=30)
    squeezed = [0.0, -7.0, -7.5, -9.0, -11.0, -14.0]
    assert rule_fires(rule, STEPS[:3], squeezed[:3]) is False  # step 20 is still warm-up
    assert rule_fires(rule, STEPS[:4], squeezed[:4]) is True
    assert not any(rule_fires(rule, STEPS[:i], [0, -1, -2, -2.5, -2.4, -3][:i]) for i in range(7))
    above = ProbeRule("hot", "above", stat="top1", threshold=0.9)
    assert rule_fires(above, [0, 1], [0.5, 0.95]) and not rule_fires(above, [0, 1], [0.5, 0.6])
    assert not rule_fires(above, [0, 1], [0.5, float("nan")])


def test_rule_config_parsing_and_validation():
    rules = parse_rules(
        {
            "displacement": {"kind": "drop_from_best", "threshold": 0.5, "stages": ["cw_dpo"]},
            "off": {"kind": "below", "enabled": False},
            "gone": None,
            "run_q10": {"kind": "below", "group": "easy", "stat": "q10", "baseline": "run"},
        }
    )
    assert [r.name for r in rules] == ["displacement", "run_q10"]
    assert rules[0].applies_to("cw_dpo") and not rules[0].applies_to("sft_c")
    assert rules[0].column == "mean" and rules[1].column == "run_q10"
    assert ProbeRule("x", "above", stat="tv", baseline="run").column == "tv"
    with pytest.raises(ValueError, match="kind"):
        ProbeRule("x", "sideways")
    with pytest.raises(ValueError, match="action"):
        ProbeRule("x", "below", action="explode")


def _fake_trainer(tmp_path, callbacks=()):
    return SimpleNamespace(
        should_stop=False, global_step=40, loggers=[], callbacks=list(callbacks), datamodule=None
    )


def _with_trajectory(tmp_path, rules, values, group="positives", stage="cw_dpo"):
    cb = DeltaLogpProbe(rules=rules)
    cb.set_stage(stage, tmp_path, first=True)
    cb.sets = {group: None}
    cb.trajectory = [{"group": group, "step": s, "mean": v} for s, v in zip(STEPS, values)]
    return cb


def test_stop_rule_sets_should_stop_and_records_the_reason(tmp_path):
    rules = {"displacement": {"kind": "drop_from_best", "threshold": 0.5, "stages": ["cw_dpo"]}}
    cb = _with_trajectory(tmp_path, rules, [0.0, 0.8, 0.1])
    trainer = _fake_trainer(tmp_path)
    cb.apply_rules(trainer, None, 40)
    assert trainer.should_stop and cb.stop_reason.startswith("displacement:")
    events = json.loads((tmp_path / "probe_events.json").read_text())
    assert events[0]["rule"] == "displacement" and events[0]["action"] == "stop"
    assert cb.summary()["early_stop"] == cb.stop_reason
    # the same trajectory in a stage the rule does not cover: nothing happens
    other = _with_trajectory(tmp_path, rules, [0.0, 0.8, 0.1], stage="sft_c")
    t2 = _fake_trainer(tmp_path)
    other.apply_rules(t2, None, 40)
    assert not t2.should_stop and other.stop_reason is None


def test_rules_and_the_probe_schedule_are_decided_across_ranks(tmp_path):
    """Under DDP a rule that holds on another rank fires here too (else a rank-local stop or
    refresh would hang the others), and so does the cost-bound schedule change."""
    asked = []

    class OtherRankHolds:  # the strategy's all-reduce as another rank would answer it
        def reduce_boolean_decision(self, decision, all=True):
            asked.append((decision, all))
            return True

    rules = {"displacement": {"kind": "drop_from_best", "threshold": 0.5, "stages": ["cw_dpo"]}}
    healthy = [0.0, 0.3, 0.5]
    local = _fake_trainer(tmp_path)
    _with_trajectory(tmp_path, rules, healthy).apply_rules(local, None, 40)
    assert not local.should_stop  # one process: nothing holds
    trainer = _fake_trainer(tmp_path)
    trainer.strategy = OtherRankHolds()
    cb = _with_trajectory(tmp_path, rules, healthy)
    cb.apply_rules(trainer, None, 40)
    assert trainer.should_stop and asked == [(False, False)]
    assert cb.stop_reason == "displacement: held on another rank at step 40"
    cb.every_n_steps, cb.max_cost_frac = 10, 0.5
    cb._bound_cost(trainer, 40)  # this rank is cheap, another is not: both slow down
    assert cb.every_n_steps == 20


def test_refresh_rule_calls_the_on_policy_callback_with_cooldown(tmp_path):
    from cwdpo.callbacks.on_policy import OnPolicyNegatives

    calls = []

    class Recorder(OnPolicyNegatives):
        def refresh(self, trainer, pl_module):
            calls.append(trainer.global_step)

    rules = {
        "refresh_on_squeeze": {
            "kind": "below",
            "group": "on_policy",
            "threshold": -1.0,
            "action": "refresh",
            "cooldown": 40,
        }
    }
    cb = _with_trajectory(tmp_path, rules, [0.0, -2.0, -3.0], group="on_policy")
    trainer = _fake_trainer(tmp_path, [Recorder(every_n_steps=1000)])
    cb.apply_rules(trainer, None, 40)
    cb.apply_rules(trainer, None, 60)  # within the cooldown
    assert calls == [40] and not trainer.should_stop and cb.stop_reason is None
    cb.apply_rules(trainer, None, 80)
    assert calls == [40, 40]  # (the fake trainer's step does not advance)


def test_log_rule_fires_when_its_condition_starts_to_hold(tmp_path):
    rules = {"squeeze": {"kind": "below", "group": "easy", "threshold": -1.0, "action": "log"}}
    cb = DeltaLogpProbe(rules=rules)
    cb.set_stage("cw_dpo", tmp_path, first=True)
    cb.sets = {"easy": None}
    trainer = _fake_trainer(tmp_path)
    for step, v in zip(STEPS, [0.0, -2.0, -3.0, 0.0, -2.0, -2.5]):
        cb.trajectory.append({"group": "easy", "step": step, "mean": v})
        cb.apply_rules(trainer, None, step)
    assert [e["step"] for e in cb.events] == [20, 80]  # not at 40/100: still holding
    assert not trainer.should_stop and cb.summary()["early_stop"] is None


def test_default_config_rules():
    from hydra import compose, initialize_config_dir

    from cwdpo.run.config import CONFIG_DIR

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        default = compose("train").callbacks.probes
        stop = compose("train", overrides=["callbacks=early_stop"]).callbacks.probes
    assert default.every_n_steps == 20 and default.n_items == 64
    rules = {r.name: r for r in parse_rules(default.rules)}
    assert rules["displacement"].kind == "drop_from_best" and rules["displacement"].action == "log"
    assert rules["squeezing"].group == "easy" and rules["squeezing"].action == "log"
    assert {r.action for r in parse_rules(stop.rules)} == {"stop"}


def test_default_config_instantiates_into_a_probe_config():
    """The Hydra `_target_` passes flat keywords; they land in one validated `ProbeConfig`."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from cwdpo.callbacks.probes import ProbeConfig
    from cwdpo.run.config import CONFIG_DIR

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cb = instantiate(compose("train").callbacks.probes)
    assert isinstance(cb, DeltaLogpProbe) and isinstance(cb.cfg, ProbeConfig)
    assert cb.cfg.groups == ["positives", "gentle", "easy"] and cb.every_n_steps == 20
    assert {r.name for r in cb.rules} == {"displacement", "squeezing"}
    kw = {"n_items": 4, "groups": ["positives", "on_policy"], "on_policy": False}
    same = DeltaLogpProbe(config=ProbeConfig(**kw))
    assert same.cfg == DeltaLogpProbe(**kw).cfg
    assert same.cfg.groups == ["positives"] and same.cfg.on_policy is True  # listed: on
    with pytest.raises(TypeError, match="not both"):
        DeltaLogpProbe(config=ProbeConfig(), n_items=4)
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        DeltaLogpProbe(every_n_steps=0)
    with pytest.raises(TypeError):
        DeltaLogpProbe(n_itmes=4)  # a typo is refused, naming the key


# ---------------------------------------------------------------- live probes on the tiny VLM
SIZES = {"train": 12, "val": 4, "test": 4, "probe": 6}


def _sft_trainer(backbone, root, steps, probe, *more):
    module, dm = shapes_sft(backbone, SIZES, steps)
    trainer = cpu_trainer(root, steps, [probe, *more], enable_checkpointing=bool(more))
    return trainer, module, dm


@torch.no_grad()
def _direct(backbone, group, n=6):
    """ℓ̄, log π and next-token log-probs of a probe group, recomputed from scratch."""
    src = ShapesSource(sizes=SIZES)
    recs = probe_records(src, "probe", n=n)
    rows = probe_texts(src, recs, group, seed=0)
    enc = backbone.collate(
        [recs[i].image.load() for i, _ in rows], [src.prompt] * len(rows), [t for _, t in rows]
    )
    backbone.model.eval()
    lp, logits, labels = backbone.logps_and_logits(enc)
    backbone.model.train()
    return lp.mean, lp.sum, torch.log_softmax(logits[labels != -100].float(), -1)


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_probe_numbers_equal_a_direct_recomputation(backbone, tmp_path):
    from cwdpo.losses.diagnostics import entropy, js_divergence, top1_prob

    probe = DeltaLogpProbe(
        every_n_steps=2,
        n_items=6,
        batch_size=4,
        n_samples=0,
        rules={"never": {"kind": "below", "stat": "ell", "threshold": -1e9}},
    )
    before = {g: _direct(backbone, g) for g in ("positives", "gentle", "easy")}
    trainer, module, dm = _sft_trainer(backbone, tmp_path, 3, probe)
    trainer.fit(module, datamodule=dm)
    after = {g: _direct(backbone, g) for g in ("positives", "gentle", "easy")}

    rows = _csv(tmp_path / "probes.csv")
    assert [(r["step"], r["group"]) for r in rows] == [
        (s, g) for s in ("0", "2", "3") for g in ("positives", "gentle", "easy")
    ]
    assert {r["stage"] for r in rows} == {"sft_c"}
    for g in ("positives", "gentle", "easy"):
        start = next(r for r in rows if r["group"] == g and r["step"] == "0")
        end = next(r for r in rows if r["group"] == g and r["step"] == "3")
        ell0, sum0, logp0 = before[g]
        ell1, sum1, logp1 = after[g]
        assert int(end["n"]) == len(ell0) == 6
        assert float(start["ell"]) == pytest.approx(ell0.mean().item(), abs=1e-5)
        assert float(start["mean"]) == 0.0
        delta = (ell1 - ell0).double().numpy()
        assert float(end["ell"]) == pytest.approx(ell1.mean().item(), abs=1e-5)
        assert float(end["mean"]) == pytest.approx(delta.mean(), abs=1e-5)
        for q in (10, 50, 90):
            assert float(end[f"q{q}"]) == pytest.approx(np.quantile(delta, q / 100), abs=1e-5)
        assert float(end["run_mean"]) == pytest.approx(delta.mean(), abs=1e-5)  # first stage
        assert float(end["sum_mean"]) == pytest.approx((sum1 - sum0).mean().item(), abs=1e-4)
        assert float(end["entropy"]) == pytest.approx(entropy(logp1).mean().item(), abs=1e-5)
        assert float(end["top1"]) == pytest.approx(top1_prob(logp1).mean().item(), abs=1e-6)
        assert float(end["tv"]) == pytest.approx(
            tv_distance(logp1.exp(), logp0.exp()).mean().item(), abs=1e-5
        )
        assert float(end["js"]) == pytest.approx(
            js_divergence(logp1.exp(), logp0.exp()).mean().item(), abs=1e-5
        )
        assert float(end["tv"]) > 0  # training moved the distributions
    assert (
        float(next(r for r in rows if r["group"] == "positives" and r["step"] == "3")["mean"]) > 0
    )
    summary = probe.summary()
    assert summary["early_stop"] is None and summary["probe_events"] == []
    assert summary["probe_seconds"] > 0 and 0 < summary["probe_cost_frac"] < 1
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert stages == [
        {
            "stage": "sft_c",
            "offset": 0,
            "steps": 3,
            "stop_reason": None,
            "probe_seconds": summary["probe_seconds"],
            "probe_cost_frac": summary["probe_cost_frac"],
        }
    ]

    # a second stage in the same run dir: stage-relative Δ restarts, the run baseline carries on
    probe2 = DeltaLogpProbe(every_n_steps=10, n_items=6, batch_size=6, n_samples=0)
    probe2.set_stage("second", tmp_path, first=False)
    trainer, module, dm = _sft_trainer(backbone, tmp_path, 1, probe2)
    trainer.fit(module, datamodule=dm)
    final = {g: _direct(backbone, g) for g in ("positives",)}
    rows = [r for r in _csv(tmp_path / "probes.csv") if r["stage"] == "second"]
    assert [r["run_step"] for r in rows if r["group"] == "positives"] == ["3", "4"]
    first = next(r for r in rows if r["group"] == "positives")
    assert float(first["mean"]) == 0.0
    assert float(first["run_mean"]) == pytest.approx(
        (after["positives"][0] - before["positives"][0]).mean().item(), abs=1e-5
    )
    last = [r for r in rows if r["group"] == "positives"][-1]
    assert float(last["run_mean"]) == pytest.approx(
        (final["positives"][0] - before["positives"][0]).mean().item(), abs=1e-5
    )


def test_early_stopping_fires_in_a_live_run(backbone, tmp_path):
    """A rule that holds from step 1 on (with patience 2) ends the stage at step 2 of 6."""
    rules = {
        "always": {
            "kind": "above",
            "group": "positives",
            "stat": "ell",
            "threshold": -1e9,
            "patience": 2,
            "min_step": 1,
        },
        "never": {"kind": "below", "group": "easy", "threshold": -1e9},
    }
    probe = DeltaLogpProbe(
        every_n_steps=1,
        n_items=3,
        batch_size=3,
        n_samples=0,
        max_cost_frac=None,
        groups=["positives", "easy"],
        rules=rules,
    )
    trainer, module, dm = _sft_trainer(backbone, tmp_path, 6, probe)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    assert (
        probe.stop_reason.startswith("always: positives ell") and "at step 2" in probe.stop_reason
    )
    assert [e["rule"] for e in probe.events] == ["always"]
    assert json.loads((tmp_path / "stages.json").read_text())[0]["stop_reason"] == probe.stop_reason


def test_resumed_stage_keeps_its_start_and_history(backbone, tmp_path):
    """Resuming from a checkpoint continues the same curves: no files wiped, no extra probe at
    the resume step, Δ still from the original stage start."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def ckpt():
        return ModelCheckpoint(
            dirpath=tmp_path / "ck", save_last=True, save_top_k=0, every_n_train_steps=2
        )

    kw = {
        "every_n_steps": 2,
        "n_items": 3,
        "batch_size": 3,
        "n_samples": 0,
        "groups": ["positives"],
        "max_cost_frac": None,
    }
    start = _direct(backbone, "positives", n=3)
    probe = DeltaLogpProbe(**kw)
    trainer, module, dm = _sft_trainer(backbone, tmp_path, 2, probe, ckpt())
    trainer.fit(module, datamodule=dm)
    before = _csv(tmp_path / "probes.csv")
    assert [r["step"] for r in before] == ["0", "2"]

    probe2 = DeltaLogpProbe(**kw)
    trainer, module, dm = _sft_trainer(backbone, tmp_path, 4, probe2, ckpt())
    trainer.fit(module, datamodule=dm, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    rows = _csv(tmp_path / "probes.csv")
    assert rows[:2] == before  # not wiped by the resumed (first) stage
    assert [r["step"] for r in rows] == ["0", "2", "4"]
    assert [r["step"] for r in probe2.trajectory] == [0, 2, 4]
    end = _direct(backbone, "positives", n=3)
    assert float(rows[2]["mean"]) == pytest.approx((end[0] - start[0]).mean().item(), abs=1e-5)
    assert float(rows[2]["tv"]) == pytest.approx(
        tv_distance(end[2].exp(), start[2].exp()).mean().item(), abs=1e-5
    )


def test_on_policy_group_is_sampled_from_the_policy_seeded_and_isolated(backbone):
    """With on-policy negatives, a fourth group is sampled once at the stage start: the same
    texts for the same seed, without consuming the training RNG."""
    src = ShapesSource(sizes=SIZES)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(source=src, needs_on_policy=True))
    module = SimpleNamespace(backbone=backbone)
    cb = DeltaLogpProbe(n_items=4, batch_size=4, on_policy_max_new_tokens=6)
    state = torch.random.get_rng_state()
    sets = cb.build_sets(trainer, module)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert set(sets) == {"positives", "gentle", "easy", "on_policy"}
    op = sets["on_policy"]
    assert 0 < len(op) <= 4 and all(t.strip() for t in op.texts)
    assert cb.build_sets(trainer, module)["on_policy"].texts == op.texts
    # dataset groups are the same texts in every stage; gentle/easy are never positives
    recs = probe_records(src, n=4)
    assert sets["positives"].texts == [t for _, t in probe_texts(src, recs, "positives", 0)]
    for g in ("gentle", "easy"):
        for img, text in zip(sets[g].image_ids, sets[g].texts):
            rec = next(r for r in recs if r.image_id == img)
            assert not src.is_positive(text, rec)
    off = SimpleNamespace(datamodule=SimpleNamespace(source=src, needs_on_policy=False))
    assert "on_policy" not in cb.build_sets(off, module)
