"""The full-grammar verifier on hand-written captions: junk, omissions, hallucinations."""

from __future__ import annotations

import pytest

from cwdpo.data import shapes as S
from cwdpo.data.shapes import Obj, Scene, ShapesWorld, WorldConfig
from cwdpo.data.sources import ShapesSource
from cwdpo.data.verifier import mentions_object, parse, verify

ONE = Scene([Obj("red", "circle", "small", "left")], seed=0)
TWO = Scene([Obj("red", "circle", "small", "left"), Obj("blue", "square", "large", "top")], seed=0)


class _Rec:
    def __init__(self, scene: Scene) -> None:
        self.meta = {"scene": scene}


def test_every_template_parses_completely():
    world = ShapesWorld(WorldConfig(min_objects=1, max_objects=4), seed=3)
    for sc in world.scenes("train", 200):
        for ref in S.references(sc):
            p = parse(ref)
            assert not p.malformed and p.unparsed == [], ref
            v = verify(p, sc)
            assert v.exact and v.precision == v.recall == v.f1 == v.score == 1.0, ref
            assert v.hallucinated == v.omitted == 0


@pytest.mark.parametrize(
    # text, scene, precision, recall (of 4 attrs per object), hallucinated, omitted, unparsed, exact
    "text, scene, prec, rec, hall, omit, junk, exact",
    [
        ("a small red circle on the left .", ONE, 1, 1, 0, 0, 0, True),
        # gold followed by junk: the old checker called this exact
        ("a small red circle on the left . banana river", ONE, 1, 1, 0, 0, 2, False),
        ("a small red circle on the left banana .", ONE, 1, 1, 0, 0, 1, False),
        # omission: precise (old facts % = 1.0) but recall 4/8 and one object omitted
        ("a small red circle on the left .", TWO, 1, 4 / 8, 0, 1, 0, False),
        ("a red circle .", TWO, 1, 2 / 8, 0, 1, 0, False),
        # hallucinated companion: 4 wrong-object facts out of 8 stated... matched optimally
        (
            "a small red circle on the left and a small blue square on the right .",
            ONE,
            4 / 8,
            1,
            1,
            0,
            0,
            False,
        ),
        # wrong colour: the object is hallucinated *and* the real one omitted (CHAIR identity)
        ("a small green circle on the left .", ONE, 3 / 4, 3 / 4, 1, 1, 0, False),
        # wrong count: 4 of 5 stated facts right, objects exact, not exact overall
        ("there are two shapes : a small red circle on the left .", ONE, 4 / 5, 1, 0, 0, 0, False),
        ("there is one shape : a small red circle on the left .", ONE, 1, 1, 0, 0, 0, True),
        # truncated (no final "."): malformed, not exact, nothing unparsed
        ("a small red circle on the left", ONE, 1, 1, 0, 0, 0, False),
        # dangling "and"
        ("a small red circle on the left and .", ONE, 1, 1, 0, 0, 1, False),
        ("banana guitar ocean .", ONE, 0, 0, 0, 1, 4, False),
        ("", ONE, 0, 0, 0, 1, 0, False),
        (
            "a large blue square on the top and a small red circle on the left .",
            TWO,
            1,
            1,
            0,
            0,
            0,
            True,
        ),
        # "on the" + non-position: the phrase ends at the shape; "on the banana" is junk
        ("a small red circle on the banana .", ONE, 1, 2 / 4 + 1 / 4, 0, 0, 3, False),
        ("A Small RED circle on the LEFT.", ONE, 1, 1, 0, 0, 0, True),  # case, no space before "."
    ],
)
def test_verify_hand_checked(text, scene, prec, rec, hall, omit, junk, exact):
    v = verify(text, scene)
    assert v.precision == pytest.approx(prec)
    assert v.recall == pytest.approx(rec)
    assert v.hallucinated == hall and v.omitted == omit
    assert v.n_unparsed == junk
    assert v.exact is exact
    assert ShapesSource.is_positive(None, text, _Rec(scene)) is exact
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    assert v.f1 == pytest.approx(f1)
    if v.n_tokens:
        assert v.score == pytest.approx(f1 * (1 - junk / v.n_tokens))
    if junk:  # the old `exact` no longer accepts junk either
        assert S.fact_scores(text, scene)["exact"] == 0.0


def test_junk_lowers_the_judge_score_in_proportion():
    gold = "a small red circle on the left ."
    s0, s1, s2 = (verify(gold + " banana" * k, ONE).score for k in (0, 1, 4))
    assert s0 == 1.0 > s1 > s2 > 0
    assert s1 == pytest.approx(8 / 9) and s2 == pytest.approx(8 / 12)


def test_header_only_at_the_start_and_mentions_object():
    p = parse("a red circle . there is one shape : a red circle .")
    assert (
        p.header is None and len(p.mentions) == 1 and len(p.unparsed) == 9
    )  # 13 tokens, 4 before the first "."
    assert mentions_object("a picture of a large blue square and a red circle .", "blue", "square")
    assert not mentions_object("a picture of a large blue circle .", "blue", "square")
    assert parse("this image shows a red circle .").header == "shows"
