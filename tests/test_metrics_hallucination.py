"""CHAIR / POPE / content-token calibration / likelihood displacement against hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from cwdpo.data.shapes import Obj, Scene, ShapesWorld, WorldConfig
from cwdpo.metrics.hallucination import caption_metrics, pope, pope_queries, pope_scores
from cwdpo.metrics.teacher_forced import (
    CONTENT_WORDS,
    content_calibration,
    content_token_mask,
    displacement_stats,
    gold_texts,
    likelihood_displacement,
)

RC = Obj("red", "circle", "large", "left")
BS = Obj("blue", "square", "small", "right")
GT = Obj("green", "triangle", "small", "top")
S1, S2, S3 = Scene([RC], 0), Scene([RC, BS], 0), Scene([RC, GT], 0)
COOC = (("red", "circle"), ("blue", "square"))


def test_caption_metrics_hand_checked():
    outputs = [
        "a large red circle on the left and a small blue square on the right .",  # S1: companion hallucinated
        "a large red circle on the left .",  # S2: companion omitted
        "a large red circle on the left and a small green triangle on the top . banana",  # S3: junk
    ]
    m = caption_metrics(outputs, [S1, S2, S3], COOC)
    # mentions 2 + 1 + 2 = 5, hallucinated 1 (blue square in S1)
    assert m["chair_i"] == pytest.approx(100 * 1 / 5)
    assert m["chair_s"] == pytest.approx(100 * 1 / 3)
    # objects 1 + 2 + 2 = 5, omitted 1 (blue square in S2)
    assert m["object_recall"] == pytest.approx(100 * 4 / 5)
    # stated 8 + 4 + 8 = 20, correct 4 + 4 + 8 = 16; recall over 4·5 = 20 attributes: 4 + 4 + 8
    assert m["attr_precision"] == pytest.approx(80.0) and m["attr_recall"] == pytest.approx(80.0)
    f1s = [2 * 0.5 * 1 / 1.5, 2 * 1 * 0.5 / 1.5, 1.0]
    assert m["f1"] == pytest.approx(100 * sum(f1s) / 3)
    assert m["malformed"] == pytest.approx(100 / 3) and m["verified_exact"] == 0.0
    assert m["length"] == pytest.approx((16 + 8 + 17) / 3)  # tokens, "." included
    # companion said in 1 of the 2 trigger-without-companion scenes (S1, S3), and in 0 of 1 present
    assert m["companion_halluc"] == pytest.approx(50.0) and m["companion_recall"] == 0.0
    assert "companion_halluc" not in caption_metrics(outputs, [S1, S2, S3])


def test_pope_scores_hand_checked():
    answers = [True, True, False, False, True, False]
    labels = [True, False, True, False, True, False]
    # tp 2, fp 1, fn 1, tn 2
    s = pope_scores(answers, labels)
    assert s["accuracy"] == pytest.approx(100 * 4 / 6)
    assert s["precision"] == pytest.approx(100 * 2 / 3) and s["recall"] == pytest.approx(
        100 * 2 / 3
    )
    assert s["f1"] == pytest.approx(100 * 2 / 3) and s["yes_ratio"] == pytest.approx(50.0)


def test_pope_queries_are_balanced_and_labelled_by_the_truth():
    scenes = ShapesWorld(WorldConfig(max_objects=3, cooc_trigger=("red", "circle")), seed=2).scenes(
        "test", 300
    )
    qs = pope_queries(scenes, seed=1, cooc=COOC)
    for name, rows in qs.items():
        assert sum(y for *_, y in rows) * 2 == len(rows), name  # balanced yes / no
        for i, u, y in rows:
            assert y == (u in {(o.colour, o.shape) for o in scenes[i].objects})
    assert all(u == ("blue", "square") for _, u, y in qs["adversarial"] if not y)
    # a policy that always names the companion next to the trigger fails exactly the adversarial
    # "no" questions: adversarial accuracy 50%, yes-ratio 100%
    from cwdpo.data.shapes import caption

    outs = []
    for sc in scenes:
        objs = list(sc.objects)
        ids = {(o.colour, o.shape) for o in objs}
        if ("red", "circle") in ids and ("blue", "square") not in ids:
            free = [
                p for p in ("left", "right", "top", "bottom") if p not in {o.position for o in objs}
            ]
            objs.append(Obj("blue", "square", "small", free[0]))
        outs.append(caption(Scene(objs, 0), 0))
    p = pope(outs, scenes, seed=1, cooc=COOC)
    assert p["pope_adv/accuracy"] == pytest.approx(50.0) and p[
        "pope_adv/yes_ratio"
    ] == pytest.approx(100.0)
    truth = pope([caption(sc, 0) for sc in scenes], scenes, seed=1, cooc=COOC)
    assert truth["pope/accuracy"] == truth["pope_adv/accuracy"] == 100.0


def test_displacement_stats_literal():
    pol = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    ref = torch.tensor([-1.0, -1.5, -3.5, -3.0])
    s = displacement_stats(pol, ref)
    assert s["fell"] == pytest.approx(50.0) and s["delta"] == pytest.approx((0 - 0.5 + 0.5 - 1) / 4)


def _records(n: int = 6):
    from cwdpo.data.sources import ShapesSource

    return ShapesSource(
        WorldConfig(), seed=0, sizes={"train": 4, "val": 4, "test": n, "probe": 4}
    ).captions("test")


def _brute_ece(confs: list[float], correct: list[bool], n_bins: int = 15) -> tuple[float, float]:
    total, ece = len(confs), 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        idx = [i for i, c in enumerate(confs) if (lo < c <= hi) or (b == 0 and c == 0.0)]
        if idx:
            ece += (
                len(idx)
                / total
                * abs(
                    sum(correct[i] for i in idx) / len(idx) - sum(confs[i] for i in idx) / len(idx)
                )
            )
    return ece, sum(confs) / total - sum(correct) / total


def test_content_calibration_matches_a_brute_force_over_content_tokens(backbone, perturb):
    perturb(backbone.model, scale=0.05, seed=3)
    recs = _records()
    texts = gold_texts(recs)
    got = content_calibration(backbone, recs, "Describe the image.", texts, batch_size=4)
    enc = backbone.collate(
        [r.image.load() for r in recs], ["Describe the image."] * len(recs), texts
    )
    backbone.model.eval()
    _, logits, labels = backbone.logps_and_logits(enc)
    confs, correct, n_content = [], [], 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            if y < 0 or backbone.tokenizer.decode([y]).strip() not in CONTENT_WORDS:
                continue
            n_content += 1
            p = torch.softmax(logits[b, t].double(), -1)
            confs.append(float(p.max()))
            correct.append(int(p.argmax()) == y)
    ece, sce = _brute_ece(confs, correct)
    # every caption's content words: colour, shape, size, position per object
    assert (
        n_content
        == sum(4 * len(r.meta["scene"].objects) for r in recs)
        == got["calib/content_tokens"]
    )
    assert got["calib/content_ece"] == pytest.approx(ece, abs=1e-5)
    assert got["calib/content_sce"] == pytest.approx(sce, abs=1e-5)
    mask = content_token_mask(labels, backbone.tokenizer)
    assert int(mask.sum()) == n_content


def test_likelihood_displacement_against_direct_sums(backbone, perturb):
    recs = _records(4)
    backbone.snapshot_reference()
    outs = ["a red circle ."] * 4
    same = likelihood_displacement(backbone, recs, "Describe the image.", outs, batch_size=4)
    assert same["disp/chosen_fell"] == 0.0 and abs(same["disp/chosen_delta"]) < 1e-5
    perturb(backbone.model, scale=0.05, seed=7)
    got = likelihood_displacement(backbone, recs, "Describe the image.", outs, batch_size=2)
    enc = backbone.collate(
        [r.image.load() for r in recs], ["Describe the image."] * 4, gold_texts(recs)
    )
    backbone.model.eval()
    d = backbone.logps(enc).sum - backbone.logps(enc, reference=True).sum
    assert got["disp/chosen_delta"] == pytest.approx(float(d.mean()), abs=1e-4)
    assert got["disp/chosen_fell"] == pytest.approx(100 * float((d < -1e-4).float().mean()))
    assert math.isfinite(got["disp/rejected_delta"]) and math.isfinite(got["disp/output_delta"])
