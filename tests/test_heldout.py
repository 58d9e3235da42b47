"""The held-out curve (cwdpo.callbacks.heldout) and steps to a common held-out target
(cwdpo.analysis.runs.heldout_convergence, the report's `steps→val target`)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from cwdpo.analysis.runs import find_runs, heldout_convergence
from cwdpo.analysis.stats import aggregate
from cwdpo.callbacks.heldout import HELDOUT_CSV, HeldoutCurve
from cwdpo.data.sources import ShapesSource
from cwdpo.metrics.hallucination import caption_metrics
from cwdpo.utils.safe_log import FAILURES
from tests.helpers import cpu_trainer, shapes_sft

SIZES = {"train": 12, "val": 4, "test": 4, "probe": 4}


def _fit(backbone, root: Path, steps: int, *callbacks: L.Callback) -> None:
    L.seed_everything(0)
    module, dm = shapes_sft(backbone, SIZES, steps)
    cpu_trainer(root, steps, callbacks).fit(module, datamodule=dm)


def _direct(backbone) -> tuple[list[str], dict[str, float]]:
    """Greedy captions of the val records and their scores, recomputed without the callback."""
    src = ShapesSource(sizes=SIZES)
    recs = src.captions("val")
    backbone.model.eval()
    with torch.no_grad():
        outs = backbone.generate(
            [r.image.load() for r in recs], [src.prompt] * len(recs), max_new_tokens=32
        )
    backbone.model.train()
    m = caption_metrics(outs, [r.meta["scene"] for r in recs])
    score = 100.0 * sum(src.score(o, r) for o, r in zip(outs, recs)) / len(recs)
    return outs, {"score": score, "f1": m["f1"], "malformed": m["malformed"]}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_curve_equals_a_direct_recomputation_and_leaves_training_alone(backbone, tmp_path):
    start_outs, start = _direct(backbone)
    curve = HeldoutCurve(every_n_steps=2, n_items=4, batch_size=3, stages=["sft_c"])
    _fit(backbone, tmp_path / "with", 3, curve)
    end_outs, end = _direct(backbone)
    assert curve.outputs == end_outs and end_outs != start_outs  # training moved the captions

    rows = _rows(tmp_path / "with" / HELDOUT_CSV)
    assert [(r["stage"], r["step"], r["split"], r["n"]) for r in rows] == [
        ("sft_c", s, "val", "4") for s in ("0", "2", "3")
    ]
    for row, want in ((rows[0], start), (rows[-1], end)):
        for k, v in want.items():
            assert float(row[k]) == pytest.approx(v, abs=1e-9), k


def test_scores_of_hand_written_captions():
    """Gold scores 100; junk after the gold lowers the verifier judge's score (the precision
    judge ignores it), an omission lowers F1."""
    from cwdpo.callbacks.heldout import score_outputs

    src = ShapesSource(sizes=SIZES, judge="verifier")
    recs = [r for r in src.captions("val") if len(r.meta["scene"].objects) == 2][:1]
    assert recs, "the val split has a two-object scene"
    gold = recs[0].references[0]
    assert score_outputs(src, recs, [gold]) == {
        "score": 100.0,
        "f1": 100.0,
        "verified_exact": 100.0,
        "malformed": 0.0,
    }
    junk = score_outputs(src, recs, [gold.rstrip(" .") + " zebra zebra ."])
    assert junk["score"] < 100.0 and junk["verified_exact"] == 0.0 and junk["malformed"] == 100.0
    precision = ShapesSource(sizes=SIZES)
    assert score_outputs(precision, recs, [gold.rstrip(" .") + " zebra ."])["score"] == 100.0
    first_object = gold.split(" and ")[0].rstrip(" .") + " ."
    omitted = score_outputs(src, recs, [first_object])
    assert omitted["f1"] < 100.0 and omitted["verified_exact"] == 0.0
    assert omitted["malformed"] == 0.0 and omitted["score"] == omitted["f1"]


def test_curve_does_not_change_the_trained_weights(tiny_vlm_path, tmp_path):
    """Greedy decoding draws no RNG, so a run with the curve trains exactly as one without."""
    from cwdpo.model.backbone import VLMBackbone

    ends = []
    for name, cbs in (("plain", ()), ("curve", (HeldoutCurve(every_n_steps=1, stages=["sft_c"]),))):
        torch.manual_seed(0)
        bb = VLMBackbone.from_pretrained(tiny_vlm_path, max_length=128)
        _fit(bb, tmp_path / name, 3, *cbs)
        ends.append(bb.model.state_dict())
    assert (tmp_path / "curve" / HELDOUT_CSV).is_file()
    assert not (tmp_path / "plain" / HELDOUT_CSV).exists()
    for k in ends[0]:
        torch.testing.assert_close(ends[0][k], ends[1][k], rtol=0, atol=0, msg=k)


def test_curve_is_off_outside_its_stages_and_at_zero_steps(backbone, tmp_path):
    _fit(backbone, tmp_path / "a", 2, HeldoutCurve(every_n_steps=1, stages=["cw_dpo"]))
    _fit(backbone, tmp_path / "b", 2, HeldoutCurve(every_n_steps=0, stages=["sft_c"]))
    assert not (tmp_path / "a" / HELDOUT_CSV).exists()
    assert not (tmp_path / "b" / HELDOUT_CSV).exists()


def test_a_failing_evaluation_is_a_counted_warning_and_training_goes_on(
    backbone, tmp_path, monkeypatch
):
    def broken(*a, **k):
        raise RuntimeError("generation exploded")

    before = FAILURES.snapshot()
    curve = HeldoutCurve(every_n_steps=1, stages=["sft_c"])
    monkeypatch.setattr(curve, "generate", broken)
    _fit(backbone, tmp_path, 2, curve)
    assert FAILURES.since(before) == {"heldout curve": 3}  # steps 0, 1, 2
    assert not (tmp_path / HELDOUT_CSV).exists()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"every_n_steps": -1}, "every_n_steps must be an integer >= 0"),
        ({"n_items": 0}, "n_items must be an integer >= 1, got 0"),
        ({"batch_size": 2.5}, "batch_size must be an integer >= 1, got 2.5"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        HeldoutCurve(**kw)


def test_default_config_curves_inside_its_stages_as_the_readme_says():
    """The default run's curve has points inside each stage it curves (not only its start and
    end), covers records the split has, uses the end-of-stage evaluation's token budget, and
    the README's description of it names the configured numbers."""
    import re

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from cwdpo.run.config import CONFIG_DIR

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train")
    cb = instantiate(cfg.callbacks.heldout)
    assert isinstance(cb, HeldoutCurve) and cb.stages
    for stage in cb.stages:
        assert stage in cfg.stage.run and stage not in cfg.stage.skip, stage
        assert 0 < cb.every_n_steps < cfg.stage[stage].steps, (stage, cb.every_n_steps)
    assert cb.n_items <= cfg.data.source.sizes[cb.split]
    assert cb.max_new_tokens == cfg.eval.max_new_tokens
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    said = re.search(r"greedy captions of (\d+) (\w+) images judged every (\d+) steps", readme)
    assert said and said.groups() == (str(cb.n_items), cb.split, str(cb.every_n_steps))


# ---------------------------------------------------------------- steps to a held-out target
def _curve(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_steps_to_the_held_out_target_on_literal_curves(tmp_path):
    f1 = [70.0, 70.5, 71.0, 70.2, 72.0]
    rows = [{"stage": "cw_dpo", "step": 20 * i, "f1": v, "score": 50.0} for i, v in enumerate(f1)]
    rows.insert(0, {"stage": "sft_c", "step": 0, "f1": 10.0, "score": 1.0})  # another stage
    p = _curve(tmp_path / "h.csv", rows)
    assert heldout_convergence(p, "cw_dpo", gain=1.0) == {
        "steps_to_heldout": 40.0,
        "heldout_gain_final": 2.0,
        "heldout_jitter": pytest.approx((0.5 + 0.5 + 0.8 + 1.8) / 4),
    }
    assert heldout_convergence(p, "cw_dpo", gain=2.0)["steps_to_heldout"] == 80.0
    never = heldout_convergence(p, "cw_dpo", gain=2.5)
    assert math.isnan(never["steps_to_heldout"]) and never["heldout_gain_final"] == 2.0
    assert heldout_convergence(p, "rpo") == {}  # no such stage
    assert heldout_convergence(tmp_path / "missing.csv", "cw_dpo") == {}
    no_f1 = _curve(
        tmp_path / "s.csv",
        [{"stage": "cw_dpo", "step": s, "score": v} for s, v in ((0, 40.0), (10, 41.5))],
    )
    assert heldout_convergence(no_f1, "cw_dpo")["steps_to_heldout"] == 10.0  # judge score


def test_report_counts_runs_that_never_reach_the_target(tmp_path):
    import yaml

    for seed, (f1_end, f1_mid) in enumerate([(73.0, 71.5), (70.5, 70.2), (72.0, 70.9)]):
        d = tmp_path / f"cw{seed}"
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={seed}"]))
        (d / "results.json").write_text(
            json.dumps({"config": {"experiment": "cw_dpo", "seed": seed}, "stages": {"cw_dpo": {}}})
        )
        steps = [(0, 70.0), (20, f1_mid), (40, f1_end)]
        _curve(d / HELDOUT_CSV, [{"stage": "cw_dpo", "step": s, "f1": v} for s, v in steps])
    agg = aggregate(find_runs([tmp_path]), baseline=None, heldout_gain=1.0)["cw_dpo"]
    assert agg["steps_to_heldout"] == {
        "mean": 30.0,
        "std": pytest.approx(14.142, abs=1e-3),
        "reached": 2,
        "of": 3,
    }
    assert agg["heldout_gain_final"]["mean"] == pytest.approx((3.0 + 0.5 + 2.0) / 3)
