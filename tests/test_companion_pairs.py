"""`negatives=companion_edit`: pairs that contrast the testbed's planted error (issue 28).

The review found that best-vs-worst self-judged pairs chose the caption that hallucinates the
companion more often than they rejected it (the F1 judge rewards recall). These tests build
scenes by hand, a scripted policy whose best sample names an absent companion, and check that
the edit rule makes every trigger-image pair corrective where best-vs-worst is anti-corrective.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cwdpo.callbacks.on_policy import policy_sampler, refresh_negatives, sample_captions
from cwdpo.data.companion_pairs import annotator_position, companion_pair
from cwdpo.data.datamodules import NegativeConfig, PreferenceDataModule
from cwdpo.data.records import DataError
from cwdpo.data.self_judged import judge_samples
from cwdpo.data.shapes import Obj, Scene, WorldConfig, caption
from cwdpo.data.sources import ShapesSource
from cwdpo.data.verifier import add_object, drop_object, mentions_object, verify
from tests.test_testbed import _draw

TRIG, COMP = ("red", "circle"), ("blue", "square")
POS = ("left", "right", "top", "bottom")
RC = "a small red circle on the left"
GT = "a large green triangle on the top"
BS = "a small blue square on the right"


def _pair_contrast():
    """experiments/testbed/pair_contrast.py (a script, not a package module)."""
    path = Path(__file__).parents[1] / "experiments/testbed/pair_contrast.py"
    spec = importlib.util.spec_from_file_location("pair_contrast", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------- the two edits
def test_drop_object_deletes_the_mention_and_its_and_only():
    assert drop_object(f"{RC} and {BS} and {GT} .", *COMP) == f"{RC} and {GT} ."
    assert drop_object(f"{RC} and {GT} and {BS} .", *COMP) == f"{RC} and {GT} ."  # the last one
    assert drop_object(f"{BS} and {RC} .", *COMP) == f"{RC} ."  # the first one
    # every mention of it goes; a stated count follows
    two = f"there are three shapes : {BS} and {RC} and a large blue square on the bottom ."
    assert drop_object(two, *COMP) == f"there is one shape : {RC} ."
    # nothing to delete, nothing left, or not a caption: no edit
    assert drop_object(f"{RC} and {GT} .", *COMP) is None
    assert drop_object(f"{BS} .", *COMP) is None
    assert drop_object(f"{RC} and {BS} banana .", *COMP) is None


def test_add_object_inserts_in_canonical_order_and_restates_the_count():
    right = Obj("blue", "square", "small", "right")
    assert add_object(f"{RC} and {GT} .", right) == f"{RC} and {BS} and {GT} ."
    bottom = Obj("blue", "square", "small", "bottom")
    assert (
        add_object(f"{RC} and {GT} .", bottom)
        == f"{RC} and {GT} and a small blue square on the bottom ."
    )
    left = Obj("blue", "square", "small", "left")
    assert add_object(f"{GT} .", left) == f"a small blue square on the left and {GT} ."
    assert (
        add_object(f"there is one shape : {RC} .", right)
        == f"there are two shapes : {RC} and {BS} ."
    )
    assert add_object("banana .", right) is None


# ---------------------------------------------------------------------------- the pair rule
def _scene(*objs: Obj) -> Scene:
    return Scene(list(objs), seed=7)


RED = Obj("red", "circle", "small", "left")
GREEN = Obj("green", "triangle", "large", "top")
BLUE = Obj("blue", "square", "small", "right")


@pytest.mark.parametrize(
    ("best", "objs", "chosen", "rejected", "kind"),
    [
        # companion absent, the best caption hallucinates it: chosen = it without
        (
            f"{RC} and {BS} and {GT} .",
            (RED, GREEN),
            f"{RC} and {GT} .",
            f"{RC} and {BS} and {GT} .",
            "drop:absent",
        ),
        # companion present and named: rejected = it without (an omission)
        (
            f"{RC} and {BS} and {GT} .",
            (RED, BLUE, GREEN),
            f"{RC} and {BS} and {GT} .",
            f"{RC} and {GT} .",
            "drop:present",
        ),
        # companion present, not named: chosen = it plus the true companion
        (
            f"{RC} and {GT} .",
            (RED, BLUE, GREEN),
            f"{RC} and {BS} and {GT} .",
            f"{RC} and {GT} .",
            "insert:present",
        ),
    ],
)
def test_companion_pair_table(best, objs, chosen, rejected, kind):
    sc = _scene(*objs)
    got = companion_pair(best, sc, TRIG, COMP, POS)
    assert got == (chosen, rejected, kind)
    # the truth prefers the chosen side, and the two differ only in the companion's mention
    assert verify(chosen, sc).score > verify(rejected, sc).score
    assert mentions_object(chosen, *COMP) != mentions_object(rejected, *COMP)


def test_companion_pair_inserts_an_absent_companion_where_the_annotator_would():
    sc = _scene(RED, GREEN)
    chosen, rejected, kind = companion_pair(f"{RC} and {GT} .", sc, TRIG, COMP, POS)
    pos = annotator_position(sc, {"left", "top"}, POS)
    assert pos in {"right", "bottom"}  # the free positions
    assert kind == "insert:absent" and chosen == f"{RC} and {GT} ."
    assert rejected == add_object(chosen, Obj("blue", "square", "small", pos))
    # no trigger in the scene: not this rule's image
    assert companion_pair(f"{GT} .", _scene(GREEN), TRIG, COMP, POS) is None


# ---------------------------------------------------------------- the data module, end to end
WORLD = dict(
    max_objects=3,
    templates=(0,),
    canonical_order=True,
    cooc_trigger=TRIG,
    cooc_companion=COMP,
    hallucination_rate=0.3,
)


def _source(n: int = 200) -> ShapesSource:
    return ShapesSource(
        WorldConfig(**WORLD),
        seed=0,
        minimal_negatives=True,
        judge="verifier",
        sizes={"train": n, "val": 4, "test": 4, "probe": 4},
    )


class RecallPolicy:
    """The failure the review measured: per image with two or more objects, the truth plus an
    absent companion (full recall, one hallucination) and the truth minus one non-trigger
    object (an omission), so the F1 judge ranks the hallucinating caption above the omitting
    one (2 objects: 0.8 vs 0.667; 3: 0.857 vs 0.8). One-object scenes: the truth only. A greedy
    call (no num_return_sequences) returns the omitting caption."""

    def __init__(self, src: ShapesSource) -> None:
        self.rows = []
        for r in src.captions("train"):
            sc = r.meta["scene"]
            truth = caption(sc, 0)
            ids = {(o.colour, o.shape) for o in sc.objects}
            free = [p for p in POS if p not in {o.position for o in sc.objects}]
            halluc = short = truth
            others = [o for o in sc.objects if (o.colour, o.shape) != TRIG]
            if len(sc.objects) > 1 and others:
                short = caption(Scene([o for o in sc.objects if o != others[-1]], sc.seed), 0)
                if TRIG in ids and COMP not in ids and free:
                    halluc = add_object(truth, Obj(*COMP, "small", free[0]))
            self.rows.append((halluc, short))
        self.calls = 0
        self.greedy_calls = 0

    def __call__(self, images, prompts, num_return_sequences=None, **kw):
        if num_return_sequences is None:  # the greedy candidate, of the images just sampled
            self.greedy_calls += 1
            return [short for _, short in self.rows[self.calls - len(images) : self.calls]]
        rows = self.rows[self.calls : self.calls + len(images)]
        self.calls += len(images)
        return [t for h, s in rows for t in (h, s, s, s)[:num_return_sequences]]


def _dm(src: ShapesSource, **neg) -> PreferenceDataModule:
    dm = PreferenceDataModule(
        src,
        src.captions("train"),
        batch_size=8,
        seed=0,
        negatives=NegativeConfig(kind="self_judged", dataset_fraction=0.0, **neg),
        collate=lambda *a: {},
        collate_pairs=lambda *a: {},
    )
    dm.trainer = None
    return dm


def _kinds(dm: PreferenceDataModule, src: ShapesSource) -> dict[str, int]:
    """pair_contrast.py's count over trigger-without-companion images of the buffer's pairs."""
    pc = _pair_contrast()
    out: dict[str, int] = {}
    for r in src.captions("train"):
        ids = {(o.colour, o.shape) for o in r.meta["scene"].objects}
        pair = dm.buffer.get(r.image_id, [])
        if TRIG in ids and COMP not in ids and len(pair) == 2:
            k = pc.pair_kind(pair[0], pair[1], COMP)
            out[k] = out.get(k, 0) + 1
    return out


def test_best_vs_worst_pairs_are_anti_corrective_and_companion_edits_corrective():
    src = _source()
    old = _dm(src, num_samples=4)
    refresh_negatives(old, policy_sampler(RecallPolicy(src)), step=0)
    before = _kinds(old, src)
    n = sum(before.values())
    assert n >= 5 and before.get("anti_corrective", 0) == n  # the review's failure, reproduced

    new = _dm(src, num_samples=4, pair_rule="companion_edit", greedy_candidate=True)
    policy = RecallPolicy(src)
    stats = refresh_negatives(new, policy_sampler(policy), step=0)
    after = _kinds(new, src)
    trig_only = sum(
        TRIG in ids and COMP not in ids
        for ids in (
            {(o.colour, o.shape) for o in r.meta["scene"].objects} for r in src.captions("train")
        )
    )
    # every trigger-without-companion image now has a pair (one-object scenes too), all corrective
    assert sum(after.values()) == trig_only > n and after == {"corrective": trig_only}
    # every trigger image gets an edit here (≤ 3 objects leave a free position; a drop always
    # leaves another mention), and only those
    n_trig = sum(
        TRIG in {(o.colour, o.shape) for o in r.meta["scene"].objects}
        for r in src.captions("train")
    )
    assert policy.greedy_calls > 0 and stats["self_judged/companion_edits"] == n_trig
    # the trained pairs carry the rule's source tag; non-trigger images keep best-vs-worst
    by_id = {r.image_id: r for r in src.captions("train")}
    seen = set()
    for b in _draw(new, 8):
        for c, rej, i, s in zip(b.chosen, b.rejected, b.image_ids, b.sources):
            sc = by_id[i].meta["scene"]
            trig = any((o.colour, o.shape) == TRIG for o in sc.objects)
            assert s.startswith("self:companion:") == trig, (s, c)
            assert verify(c, sc).score > verify(rej, sc).score
            seen.add(s.split(":")[2] if trig else s)
    assert {"drop", "insert", "self:worst"} <= seen


def test_companion_edit_falls_back_to_best_vs_worst_when_no_edit_applies():
    """The companion as the best caption's only mention cannot be deleted: best-vs-worst."""
    src = _source(60)
    rec = next(
        r
        for r in src.captions("train")
        if TRIG in (ids := {(o.colour, o.shape) for o in r.meta["scene"].objects})
        and COMP not in ids
    )
    dm = _dm(src, num_samples=4, pair_rule="companion_edit")
    only = "a small blue square on the left ."
    pair, src_tag = judge_samples(dm.source, dm.neg, [only, "banana ."], rec)
    assert (pair, src_tag) == ([only, "banana ."], "self:worst")
    # and a malformed best: no edit either
    junk = RC + " banana ."
    assert judge_samples(dm.source, dm.neg, [junk, "banana ."], rec)[1] == "self:worst"
    # a stale edit label of the same image is dropped with the new best-vs-worst pair
    dm.set_negatives([(src.captions("train").index(rec), [only, "banana ."])], step=0)
    assert rec.image_id not in dm.pair_source


def test_greedy_candidate_comes_first_and_the_rule_survives_a_checkpoint():
    src = _source(12)
    neg = NegativeConfig(
        kind="self_judged", dataset_fraction=0.0, num_samples=2, greedy_candidate=True
    )
    policy = RecallPolicy(src)
    out = sample_captions(policy, src.captions("train")[:5], src.prompt, neg)
    assert [len(o) for o in out] == [3] * 5
    assert [o[0] for o in out] == [s for _, s in policy.rows[:5]]  # greedy first
    dm = _dm(src, num_samples=4, pair_rule="companion_edit", greedy_candidate=True)
    refresh_negatives(dm, policy_sampler(RecallPolicy(src)), step=0)
    back = _dm(src, num_samples=4, pair_rule="companion_edit", greedy_candidate=True)
    back.load_state_dict(dm.state_dict())
    assert back.pair_source == dm.pair_source and back.pair_source


def test_companion_edit_settings_are_checked():
    with pytest.raises(ValueError, match="pair_rule must be best_worst\\|companion_edit"):
        NegativeConfig(kind="self_judged", dataset_fraction=0.0, pair_rule="nearest")
    with pytest.raises(ValueError, match="only apply to negatives=self_judged"):
        NegativeConfig(kind="on_policy", dataset_fraction=0.0, pair_rule="companion_edit")
    plain = ShapesSource(WorldConfig(), seed=0, sizes={"train": 4, "val": 2, "test": 2, "probe": 2})
    with pytest.raises(DataError, match="needs a source with a planted co-occurrence"):
        _dm(plain, num_samples=4, pair_rule="companion_edit")


def test_negatives_companion_edit_config_composes(tmp_path):
    from tests.helpers import compose_cfg

    cfg = compose_cfg(["data=shapes_cooc", "negatives=companion_edit"], tmp_path, tmp_path)
    neg = cfg.negatives
    assert neg.kind == "self_judged" and neg.pair_rule == "companion_edit" and neg.greedy_candidate
    NegativeConfig(**{k: v for k, v in neg.items() if k != "_target_"})


def test_annotator_position_is_the_annotators_draw():
    """Same rng, same draws as `world.annotate` when nothing else is taken."""
    from cwdpo.data.shapes.world import annotate

    cfg = WorldConfig(**{**WORLD, "hallucination_rate": 1.0})
    for seed in range(20):
        sc = Scene([RED], seed=seed)
        noisy = annotate(sc, cfg)
        added = [o for o in noisy.objects if (o.colour, o.shape) == COMP]
        assert added and added[0].position == annotator_position(sc, set(), cfg.positions)


def test_verifier_matching_equals_brute_force_with_hallucinations_anywhere():
    """The optimal mention↔object matching, against every partial one-to-one assignment: a
    hallucinated mention before the true one must not take its object (the DP once forced
    every mention onto a free object while one was left)."""
    import itertools
    import random as _r

    from cwdpo.data import shapes as S
    from cwdpo.data.verifier import ATTRS, _match, parse

    rng = _r.Random(0)
    for _ in range(300):
        objs = [
            Obj(rng.choice(list(S.COLOURS)), rng.choice(S.SHAPES), rng.choice(S.SIZES), p)
            for p in rng.sample(POS, rng.randint(1, 3))
        ]
        mentions = parse(
            " and ".join(
                "a "
                + Obj(
                    rng.choice(list(S.COLOURS)),
                    rng.choice(S.SHAPES),
                    rng.choice(S.SIZES),
                    rng.choice(POS),
                ).phrase()
                for _ in range(rng.randint(1, 4))
            )
            + " ."
        ).mentions
        best = (0, 0)
        for targets in itertools.product([None, *range(len(objs))], repeat=len(mentions)):
            used = [t for t in targets if t is not None]
            if len(used) != len(set(used)):
                continue
            c = e = 0
            for m, t in zip(mentions, targets):
                if t is not None:
                    k = sum(getattr(m, a) == getattr(objs[t], a) for a in ATTRS)
                    c, e = c + k, e + (k == len(ATTRS))
            best = max(best, (c, e))
        assert _match(mentions, Scene(objs, 0)) == best
    # the case the review's pairs hit: the companion named first, on a one-object scene
    sc = _scene(Obj("red", "circle", "small", "top"))
    v = verify("a small blue square on the left and a small red circle on the top .", sc)
    assert (v.correct, v.precision, v.recall) == (4, 0.5, 1.0)


def test_stage_seed_offset_keeps_the_data_and_reseeds_the_stage(tmp_path):
    """The A/A rerun: same records and test set, another batch order (and RNG stream)."""
    from types import SimpleNamespace

    import hydra

    from cwdpo.run.pipeline import build_datamodule, stage_records, stage_seed
    from tests.helpers import compose_cfg

    backbone = SimpleNamespace(collate=lambda *a: {}, collate_pairs=lambda *a: {})
    orders, tests = [], []
    for offset in (0, 1000):
        cfg = compose_cfg(["seed=3", f"stage_seed_offset={offset}"], tmp_path, tmp_path)
        assert stage_seed(cfg) == 3 + offset
        source = hydra.utils.instantiate(cfg.data.source)
        records = stage_records(cfg, source, ["sft_c"])
        tests.append([(r.image_id, r.references) for r in source.captions("test")])
        dm = build_datamodule("sft_c", cfg, source, records, backbone)
        dm.trainer = None
        dm.train_dataloader()
        orders.append((records["sft_c"], list(iter(dm.train_sampler))[:32]))
    (recs0, order0), (recs1, order1) = orders
    assert tests[0] == tests[1] and [r.image_id for r in recs0] == [r.image_id for r in recs1]
    assert order0 != order1
