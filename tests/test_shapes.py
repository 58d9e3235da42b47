"""ShapesWorld: determinism, splits, the fact checker (hand-checked), negatives and rendering."""

from __future__ import annotations

import numpy as np
import pytest

from cwdpo.data import shapes as S
from cwdpo.data.shapes import Obj, Scene, ShapesWorld, WorldConfig
from cwdpo.data.sources import ShapesSource

BIG = WorldConfig(min_objects=1, max_objects=4)


def _is_positive(text: str, scene: Scene) -> bool:
    return ShapesSource.is_positive(None, text, _Rec(scene))


class _Rec:  # the only field ShapesSource.is_positive reads
    def __init__(self, scene):
        self.meta = {"scene": scene}


# ------------------------------------------------------------------------- determinism, splits
def test_pairs_and_captions_are_deterministic_in_the_seed():
    a = ShapesWorld(BIG, seed=3).pairs("train", 30)
    b = ShapesWorld(BIG, seed=3).pairs("train", 30)
    assert [(p.chosen, p.rejected, p.source, p.image_id) for p in a] == [
        (p.chosen, p.rejected, p.source, p.image_id) for p in b
    ]
    assert np.array_equal(np.asarray(a[5].image.load()), np.asarray(b[5].image.load()))
    c = ShapesWorld(BIG, seed=4).pairs("train", 30)
    assert [p.chosen for p in a] != [p.chosen for p in c]
    ca = ShapesWorld(seed=3).captions("val", 10)
    cb = ShapesWorld(seed=3).captions("val", 10)
    assert [r.references for r in ca] == [r.references for r in cb]


def test_scenes_prefix_stable_and_offset_pairs_continue_the_stream():
    w = ShapesWorld(BIG, seed=1)
    s10, s20 = w.scenes("train", 10), w.scenes("train", 20)
    assert [s.objects for s in s10] == [s.objects for s in s20[:10]]
    later = w.pairs("train", 5, offset=10)
    assert [p.meta["scene"].objects for p in later] == [s.objects for s in s20[10:15]]
    assert [p.image_id for p in later] == [f"shapes-train-{i}" for i in range(10, 15)]


def test_splits_are_disjoint_streams():
    w = ShapesWorld(BIG, seed=0)
    splits = ("train", "val", "test", "probe")
    scenes = {s: w.scenes(s, 200) for s in splits}
    seeds = {s: {sc.seed for sc in scenes[s]} for s in splits}
    for i, a in enumerate(splits):
        assert len(seeds[a]) == 200
        for b in splits[i + 1 :]:
            assert not seeds[a] & seeds[b], (a, b)
            assert [sc.objects for sc in scenes[a]] != [sc.objects for sc in scenes[b]]
    ids = {s: {r.image_id for r in w.captions(s, 20)} for s in splits}
    assert not ids["train"] & ids["test"]


def test_scene_sizes_respect_the_config():
    for sc in ShapesWorld(BIG, seed=2).scenes("train", 300):
        assert 1 <= len(sc.objects) <= 4
        assert len({o.position for o in sc.objects}) == len(sc.objects)
    assert {len(sc.objects) for sc in ShapesWorld(BIG).scenes("train", 300)} == {1, 2, 3, 4}


# ------------------------------------------------------------------------- fact checker
def test_every_reference_is_fully_correct_and_positive():
    for rec in ShapesWorld(BIG, seed=7).captions("train", 150):
        scene = rec.meta["scene"]
        assert len(rec.references) == 4 and len(set(rec.references)) >= 3
        for ref in rec.references:
            s = S.fact_scores(ref, scene)
            assert s["accuracy"] == 1.0, ref
            assert s["recall"] == 1.0 and s["exact"] == 1.0, ref
            assert _is_positive(ref, scene)


ONE = Scene([Obj("red", "circle", "small", "left")], seed=0)
TWO = Scene([Obj("red", "circle", "small", "left"), Obj("blue", "square", "large", "top")], seed=0)


@pytest.mark.parametrize(
    "text, scene, accuracy, recall, exact, stated",
    [
        ("a small red circle on the left .", ONE, 1.0, 1.0, 1.0, 4),
        ("a large red circle on the left .", ONE, 3 / 4, 1.0, 0.0, 4),
        ("a small green triangle on the right .", ONE, 1 / 4, 1.0, 0.0, 4),
        ("there is one shape : a red circle .", ONE, 1.0, 1.0, 0.0, 3),  # no size / position
        # wrong count: 1 of 5 facts wrong (the object itself is still described exactly)
        ("there are two shapes : a small red circle on the left .", ONE, 4 / 5, 1.0, 1.0, 5),
        ("a small red circle on the left and a red circle .", ONE, 4 / 6, 1.0, 0.0, 6),
        ("banana guitar ocean .", ONE, 0.0, 0.0, 0.0, 0),
        ("", ONE, 0.0, 0.0, 0.0, 0),
        ("A Small RED circle on the LEFT .", ONE, 1.0, 1.0, 1.0, 4),  # case-insensitive
        # order of mention does not matter; each mention matched to its own object
        ("a large blue square on the top and a small red circle on the left .", TWO, 1, 1, 1, 8),
        ("a small red circle on the left .", TWO, 1.0, 0.5, 0.0, 4),  # precise but incomplete
        ("there are three shapes : a red circle and a blue square .", TWO, 4 / 5, 1.0, 0.0, 5),
    ],
)
def test_fact_scores_hand_checked(text, scene, accuracy, recall, exact, stated):
    s = S.fact_scores(text, scene)
    assert s["accuracy"] == pytest.approx(accuracy)
    assert s["recall"] == pytest.approx(recall)
    assert s["exact"] == exact
    assert s["stated"] == stated
    assert S.fact_accuracy(text, scene) == pytest.approx(accuracy)
    assert _is_positive(text, scene) == (accuracy == 1.0 and exact == 1.0)


def test_fact_scores_matching_is_not_fooled_by_mention_order():
    """One wrong colour in a 2-object scene is exactly 1 wrong fact out of 8, whichever object is
    mentioned first. A greedy first-come matching assigns the wrong mention to the other object
    (tie 3/4 vs 3/4, broken by index) and then scores the correct mention 2/4 → 5/8."""
    scene = Scene(
        [Obj("blue", "circle", "small", "right"), Obj("red", "circle", "small", "left")], seed=0
    )
    left_first = "a small blue circle on the left and a small blue circle on the right ."
    right_first = "a small blue circle on the right and a small blue circle on the left ."
    assert S.fact_scores(right_first, scene)["accuracy"] == pytest.approx(7 / 8)
    assert S.fact_scores(left_first, scene)["accuracy"] == pytest.approx(7 / 8)


def test_parse_caption_extracts_objects_and_count():
    f = S.parse_caption(
        "there are two shapes : a large red square on the bottom and a blue circle ."
    )
    assert f.count == "two"
    assert f.objects == [("large", "red", "square", "bottom"), (None, "blue", "circle", None)]
    assert S.parse_caption("a picture of nothing").objects == []


# ------------------------------------------------------------------------- negatives
def test_hard_negatives_change_exactly_one_fact():
    pairs = ShapesWorld(BIG, seed=11).pairs("train", 600, easy_fraction=0.0)
    assert len(pairs) >= 590
    kinds = set()
    for p in pairs:
        scene, refs = p.meta["scene"], p.meta["references"]
        assert p.source.startswith("hard:")
        kinds.add(p.source)
        assert p.rejected not in refs and p.rejected != p.chosen
        s = S.fact_scores(p.rejected, scene)
        assert 0.5 <= s["accuracy"] < 1.0, (p.rejected, scene.objects)
        # exactly one of the stated facts is wrong
        assert s["accuracy"] == pytest.approx((s["stated"] - 1) / s["stated"]), (
            p.rejected,
            scene.objects,
        )
        assert not _is_positive(p.rejected, scene)
    assert kinds == {f"hard:{k}" for k in ("colour", "shape", "size", "position", "count")}


def test_hard_negative_default_world_one_fact():
    """The default (1–2 object) world as used in training, with every fact hand-counted."""
    for p in ShapesWorld(seed=0).pairs("train", 300, easy_fraction=0.0):
        s = S.fact_scores(p.rejected, p.meta["scene"])
        assert s["accuracy"] == pytest.approx((s["stated"] - 1) / s["stated"]), p.rejected


def test_easy_negatives_are_wrong_or_off_distribution():
    pairs = ShapesWorld(BIG, seed=5).pairs("train", 400, easy_fraction=1.0)
    by_kind: dict[str, list[float]] = {}
    vocab_in_captions = set(" ".join(r for p in pairs for r in p.meta["references"]).split())
    for p in pairs:
        scene = p.meta["scene"]
        assert p.source.startswith("easy:")
        assert p.rejected not in p.meta["references"]
        assert not _is_positive(p.rejected, scene), p.rejected
        acc = S.fact_accuracy(p.rejected, scene)
        by_kind.setdefault(p.source, []).append(acc)
        if p.source == "easy:off_distribution":
            assert acc == 0.0 and S.fact_scores(p.rejected, scene)["stated"] == 0
            assert set(p.rejected.split()) - {"."} <= set(S.DISTRACTORS)
            assert not (set(p.rejected.split()) - {"."}) & vocab_in_captions
    assert set(by_kind) == {"easy:other_image", "easy:shuffled", "easy:off_distribution"}
    hard = ShapesWorld(BIG, seed=5).pairs("train", 400, easy_fraction=0.0)
    hard_mean = np.mean([S.fact_accuracy(p.rejected, p.meta["scene"]) for p in hard])
    for kind, accs in by_kind.items():
        assert np.mean(accs) < hard_mean - 0.2, kind  # graded difficulty: easy ≪ hard


def test_pairs_chosen_is_a_reference_and_prompt():
    for p in ShapesWorld(seed=9).pairs("train", 50):
        assert p.chosen in p.meta["references"]
        assert p.prompt == S.PROMPT
        assert _is_positive(p.chosen, p.meta["scene"])


def test_vocabulary_covers_everything_the_world_emits():
    vocab = set(S.vocabulary())
    for p in ShapesWorld(BIG, seed=1).pairs("train", 300, easy_fraction=0.5):
        for text in [p.chosen, p.rejected, *p.meta["references"]]:
            assert set(text.split()) <= vocab, text
    assert set(S.PROMPT.replace(".", " .").split()) <= vocab


# ------------------------------------------------------------------------- rendering
def test_render_puts_the_right_colour_at_object_centres():
    cfg = WorldConfig(min_objects=1, max_objects=4, noise=0.0)
    n_checked = 0
    for sc in ShapesWorld(cfg, seed=2).scenes("train", 120):
        img = np.asarray(sc.render())
        s = sc.image_size
        assert img.shape == (s, s, 3) and img.dtype == np.uint8
        assert tuple(img[0, 0]) == (245, 245, 245)  # background corner
        for o in sc.objects:
            fx, fy = {
                "left": (0.25, 0.5),
                "right": (0.75, 0.5),
                "top": (0.5, 0.25),
                "bottom": (0.5, 0.75),
            }[o.position]
            # a point just below the nominal centre lies inside circle, square and triangle
            # (apex up) for any jitter of ±0.04·size
            x, y = int(fx * s), int((fy + 0.05) * s)
            assert tuple(img[y, x]) == S.COLOURS[o.colour], (o, sc.seed)
            n_checked += 1
    assert n_checked > 200


def test_render_size_noise_and_determinism():
    sc = Scene([Obj("green", "square", "large", "right")], seed=5, image_size=48, noise=0.05)
    a, b = np.asarray(sc.render()), np.asarray(sc.render())
    assert a.shape == (48, 48, 3) and np.array_equal(a, b)
    clean = np.asarray(Scene(sc.objects, 5, 48, 0.0).render()).astype(int)
    diff = np.abs(a.astype(int) - clean)
    assert 2 < diff.mean() < 30  # noise present but the picture is still there
    big = np.asarray(Scene([Obj("red", "square", "large", "left")], 0, 32, 0.0).render())
    small = np.asarray(Scene([Obj("red", "square", "small", "left")], 0, 32, 0.0).render())
    red = np.array(S.COLOURS["red"])
    assert (big == red).all(-1).sum() > 2 * (small == red).all(-1).sum()
