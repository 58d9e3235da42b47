"""Dataset negatives for captioning: mined vocab, easy and hard negatives, pair building."""

from __future__ import annotations

import difflib
import random
import re

import pytest

from cwdpo.data.caption_negatives import (
    EASY_SOURCE,
    CaptionVocab,
    easy_negative,
    hard_negative,
    normalize,
    perturb,
)
from cwdpo.data.karpathy import read_karpathy
from cwdpo.data.records import CaptionRecord, DataError, ImageRef
from tests.formats import write_karpathy
from tests.helpers import make_dataset_pairs

CORPUS = [
    "A red car and a blue car.",
    "Two dogs on top of a bench.",
    "A grey cat under a table, three birds.",
    "a man to the left of a woman",
    "An orange on a plate",
]


def _rec(image_id: str, *refs: str) -> CaptionRecord:
    return CaptionRecord(
        image_id=image_id, image=ImageRef(path=f"{image_id}.jpg"), references=list(refs)
    )


def _words(text: str) -> list[str]:
    # articles a/an are folded together: fixing "a"/"an" is not a second change
    return ["a" if w == "an" else w for w in re.findall(r"\w+", text.lower())]


def test_mined_vocab_content():
    v = CaptionVocab.mine(CORPUS)
    assert v.colours == {"blue": 1, "grey": 1, "orange": 1, "red": 1}
    assert v.numbers == {"three": 1, "two": 1}
    assert v.spatial == {"left": 1, "on top of": 1, "under": 1}
    assert v.objects == {
        "bench": 1, "birds": 1, "car": 2, "cat": 1, "dogs": 1, "man": 1, "plate": 1,
        "table": 1, "woman": 1,
    }  # fmt: skip
    assert v.object_forms["dogs"] == ("dog", True) and v.object_forms["man"] == ("man", False)
    assert CaptionVocab.mine(CORPUS, min_count=2).objects == {"car": 2}
    recs = [_rec("1", *CORPUS[:2]), _rec("2", *CORPUS[2:])]
    assert CaptionVocab.mine(recs) == v  # records and plain strings mine the same


def test_determiner_nouns_are_opt_in():
    caps = ["a lamp on a desk", "a lamp near a small dog", "a small lamp"]
    assert "lamp" not in CaptionVocab.mine(caps).objects
    v = CaptionVocab.mine(caps, determiner_min_count=2)
    assert v.objects["lamp"] == 2 and "small" not in v.objects
    out = perturb("a lamp", v, random.Random(0))
    assert out is not None and out.kind == "object" and out.original == "lamp"


def test_candidates_exclude_synonyms_and_keep_number_and_plurality():
    v = CaptionVocab.mine(
        ["a grey car", "a gray car", "a bike", "a bicycle", "two men", "one man", "2 cats",
         "three dogs", "a dog", "a blue bike", "the man on the left", "a cat above the right car"]
    )  # fmt: skip
    assert v.candidates("colour", "grey") == ["blue"]
    assert "bicycle" not in v.candidates("object", "bike") and "dog" in v.candidates(
        "object", "bike"
    )
    assert v.candidates("object", "men") == ["cats", "dogs"]  # plurals only
    assert v.candidates("number", "two") == ["three"]  # words only, never "one" or "2"
    assert v.candidates("number", "one") == []
    assert v.candidates("spatial", "left") == ["right"]
    assert v.candidates("spatial", "above") == []  # "left"/"right" are not prepositions


def test_hard_negative_changes_exactly_one_word_of_one_class():
    v = CaptionVocab.mine(CORPUS)
    seen_kinds = set()
    for seed in range(40):
        for cap in CORPUS:
            p = perturb(cap, v, random.Random(seed))
            assert p is not None
            seen_kinds.add(p.kind)
            ops = [
                op
                for op in difflib.SequenceMatcher(a=_words(cap), b=_words(p.text)).get_opcodes()
                if op[0] != "equal"
            ]
            assert len(ops) == 1 and ops[0][0] == "replace", (cap, p)
            _, i1, i2, j1, j2 = ops[0]
            assert " ".join(_words(cap)[i1:i2]) == p.original.lower()
            assert " ".join(_words(p.text)[j1:j2]) == p.replacement.lower()
            attr = {"colour": "colours", "number": "numbers", "object": "objects"}
            assert p.replacement.lower() in getattr(v, attr.get(p.kind, p.kind))
            assert p.source == f"hard:{p.kind}"
    assert seen_kinds == {"object", "colour", "number", "spatial"}


def test_hard_negative_never_equals_a_reference():
    refs = ["A red car.", "a BLUE car", "A green car!"]
    v = CaptionVocab.mine(["a red car", "a blue car", "a green car", "a yellow car"])
    for seed in range(30):
        out = hard_negative(refs[0], v, random.Random(seed), references=refs)
        assert out is not None
        text, source = out
        assert source == "hard:colour" and text == "A yellow car."
        assert normalize(text) not in {normalize(r) for r in refs}
    # every possible swap is a reference -> None (caller falls back)
    assert hard_negative(refs[0], v, random.Random(0), references=[*refs, "a yellow car"]) is None
    assert hard_negative("nothing to swap here", v, random.Random(0)) is None


def test_case_and_article_follow_the_swap():
    v = CaptionVocab.mine(["an apple", "a banana", "Red car", "blue car"])
    texts = {perturb("An apple.", v, random.Random(s)).text for s in range(10)}
    assert texts == {"A banana.", "A car."}  # "An" follows the swap
    p = perturb("Red car", v, random.Random(0), kinds=("colour",))
    assert p is not None and p.text == "Blue car" and p.replacement == "Blue"


def test_easy_negative_is_another_images_caption():
    pool = [
        _rec("1", "a dog on grass", "a puppy"),
        _rec("2", "a dog on grass", "a cat on a sofa"),  # shares a caption with image 1
        _rec("3", "a plane in the sky"),
    ]
    for seed in range(30):
        text, source = easy_negative(pool[0], pool, random.Random(seed))
        assert source == EASY_SOURCE
        assert text in ("a cat on a sofa", "a plane in the sky")
    with pytest.raises(DataError, match="no caption of another image"):
        easy_negative(pool[0], pool[:1], random.Random(0))


def test_make_dataset_pairs_sources_meta_and_determinism():
    recs = [
        _rec("1", "A red car next to a tree.", "a blue car"),
        _rec("2", "Two dogs on a bench.", "dogs resting"),
        _rec("3", "A clock on top of a building."),
        _rec("4"),  # no references: skipped, counted
    ]
    stats: dict[str, int] = {}
    pairs = make_dataset_pairs(
        recs, "Describe the image.", hard_fraction=0.5, rng_seed=1, stats=stats
    )
    assert len(pairs) == 5  # one per (record, reference)
    assert stats["skipped_no_references"] == 1
    assert sum(n for k, n in stats.items() if k.startswith(("hard:", "easy:"))) == 5
    again = make_dataset_pairs(recs, "Describe the image.", hard_fraction=0.5, rng_seed=1)
    assert [(p.rejected, p.source) for p in pairs] == [(p.rejected, p.source) for p in again]
    by_id = {r.image_id: r for r in recs}
    for p in pairs:
        refs = by_id[p.image_id].references
        assert p.prompt == "Describe the image." and p.chosen == refs[p.meta["reference_index"]]
        assert p.image is by_id[p.image_id].image
        assert normalize(p.rejected) not in {normalize(r) for r in refs}
        if p.source.startswith("hard:"):
            assert set(p.meta["perturbed"]) == {"kind", "from", "to"}
            assert p.meta["perturbed"]["kind"] == p.source.split(":")[1]
        else:
            assert p.source == EASY_SOURCE and p.meta["negative_image_id"] != p.image_id

    all_hard = make_dataset_pairs(recs, "p", hard_fraction=1.0, rng_seed=0)
    fallback = [p for p in all_hard if p.source == EASY_SOURCE]
    assert all(p.meta["fallback"] == "no_hard_negative" for p in fallback)
    assert {p.chosen for p in fallback} == {"dogs resting"}  # the only caption with nothing to swap
    assert all(p.source == EASY_SOURCE for p in make_dataset_pairs(recs, "p", hard_fraction=0.0))
    per_record = make_dataset_pairs(recs, "p", per="record")
    assert sorted(p.image_id for p in per_record) == ["1", "2", "3"]


def test_pairs_from_a_karpathy_fixture(tmp_path):
    fx = write_karpathy(tmp_path)
    recs = read_karpathy(fx.path, fx.image_root, splits=("train", "val"))
    pairs = make_dataset_pairs(recs, "Caption:", hard_fraction=1.0, rng_seed=0)
    assert len(pairs) == sum(len(r.references) for r in recs)
    hard = [p for p in pairs if p.source.startswith("hard:")]
    assert len(hard) >= len(pairs) // 2
    for p in hard:
        assert p.rejected != p.chosen and p.meta["perturbed"]["from"] in p.chosen
