"""AMBER: hand-written files in the repository's format, scores computed by hand."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cwdpo.errors import DataError
from cwdpo.metrics.benchmarks import amber as amber_module
from cwdpo.metrics.benchmarks.amber import AmberBenchmark, read_yes_no
from tests.bench_formats import AMBER_DIS_ANSWERS as DIS_ANSWERS
from tests.bench_formats import AMBER_DISCRIMINATIVE as DISCRIMINATIVE
from tests.bench_formats import AMBER_GEN_ANSWERS as GEN_ANSWERS
from tests.bench_formats import AMBER_GENERATIVE as GENERATIVE
from tests.bench_formats import write_amber


def test_yes_no_reading_rules():
    for _, _, _, text, by_word, by_exact in DISCRIMINATIVE:
        assert read_yes_no(text, "yes_word") == by_word, text
        assert read_yes_no(text, "exact") == by_exact, text
    with pytest.raises(ValueError, match="answer_rule must be one of"):
        read_yes_no("Yes", "first")


def test_discriminative_scores_by_hand(tmp_path):
    paths = write_amber(tmp_path)
    paths["queries"] = paths["queries"][1]
    bench = AmberBenchmark(**paths)  # similarity="spacy" is not needed without generative items
    items = bench.read()
    assert [it.id for it in items] == [str(d[0]) for d in DISCRIMINATIVE]
    assert items[0].prompt == "Question 1005?" and items[0].images[0].load().size == (24, 24)
    got = bench.score(items, DIS_ANSWERS)
    # yes_word: right 1005 1006 1007 1011 1012 = 5/8; predicted No: 1006 1007 1008 1010 1011,
    # of which truly no 3 → P 60; true no 1006 1007 1009 1011 → R 3/4; F1 = 2·60·75/135
    want = {
        "amber/discriminative/accuracy": 62.5,
        "amber/discriminative/precision": 60.0,
        "amber/discriminative/recall": 75.0,
        "amber/discriminative/f1": 2 * 60 * 75 / 135,
        "amber/discriminative/unread": 0.0,
        # existence 1005 1006 1011 1012: all right
        **{f"amber/existence/{m}": 100.0 for m in ("accuracy", "precision", "recall", "f1")},
        # attribute 1007 (no/No) 1008 (yes/No) 1010 (yes/No): 1 right, P 1/3, R 1/1
        "amber/attribute/accuracy": 100 / 3,
        "amber/attribute/precision": 100 / 3,
        "amber/attribute/recall": 100.0,
        "amber/attribute/f1": 50.0,
        # relation 1009 (no/Yes): no predicted No → precision 0 (not a division by zero)
        **{f"amber/relation/{m}": 0.0 for m in ("accuracy", "precision", "recall", "f1")},
    }
    assert got == pytest.approx(want)
    # exact (inference.py without reduction): only 1012's " Yes " is right; "No." is unread
    exact = AmberBenchmark(**paths, answer_rule="exact").score(items, DIS_ANSWERS)
    assert exact["amber/discriminative/accuracy"] == 12.5
    assert exact["amber/discriminative/unread"] == 5.0
    assert exact["amber/discriminative/precision"] == 0.0  # 1008's "No" is wrong
    assert exact["amber/existence/accuracy"] == 25.0


def test_generative_scores_by_hand_without_word_vectors(tmp_path):
    paths = write_amber(tmp_path)
    paths["queries"] = paths["queries"][0]
    bench = AmberBenchmark(**paths, similarity="exact")
    items = bench.read()
    assert items[0].prompt == "Describe this image."
    assert bench.nouns(GENERATIVE[0][3]) == ["puppy", "lawn", "cat", "background"]
    got = bench.score(items, GEN_ANSWERS)
    # nouns 4 + 1 + 3 = 8, hallucinated cat, man, woman = 3; cover (2 + 1 + 1) / (3 + 2 + 1);
    # responses with a hallucination: 1 and 3 of 3; cog (cat, person) / (2 + 2 + 1)
    assert got == pytest.approx(
        {
            "amber/generative/chair": 37.5,
            "amber/generative/cover": 400 / 6,
            "amber/generative/hal": 200 / 3,
            "amber/generative/cog": 40.0,
        }
    )
    lower = AmberBenchmark(**paths, similarity="exact", lowercase=True)
    got = lower.score(lower.read(), GEN_ANSWERS)  # "Trees" → tree now counts: 3 of 9, 5 of 6
    assert got["amber/generative/chair"] == pytest.approx(100 / 3)
    assert got["amber/generative/cover"] == pytest.approx(500 / 6)


def test_both_tasks_give_the_amber_score(tmp_path):
    bench = AmberBenchmark(**write_amber(tmp_path), similarity="exact")
    got = bench.score(bench.read(), {**GEN_ANSWERS, **DIS_ANSWERS})
    assert got["amber/amber_score"] == pytest.approx((100 - 37.5 + 2 * 60 * 75 / 135) / 2)
    assert got["amber/generative/chair"] == 37.5 and got["amber/discriminative/accuracy"] == 62.5


def test_official_matching_rules(tmp_path):
    """The first matching word decides; a truth object listed twice is covered once (as in
    inference.py); a global safe word counts as a noun but never as a hallucination."""
    bench = AmberBenchmark(**write_amber(tmp_path), similarity="exact")
    bench.read()
    v = bench.judge_description("A dog and a dog in the background.", ["dog", "dog"], ["cat"])
    assert v == {"flags": [False, False, False], "covered": [True, False], "cog": [False]}
    v = bench.judge_description("A pet kitten.", ["dog"], ["cat"])
    assert v == {"flags": [False, True], "covered": [True], "cog": [True]}
    # where the offline noun finding differs from NLTK's POS tagger: every token is a candidate,
    # so the colour adjective "orange" (JJ for the tagger) counts as the object orange
    assert bench.nouns("An orange cat.") == ["orange", "cat"]


def test_word_vector_step_with_a_stand_in_similarity(tmp_path, monkeypatch):
    """similarity="spacy" wires in spaCy's similarity; with a stand-in: hound ~ dog (0.85)
    covers the dog and is no hallucination, kitty ~ cat (0.9) is a Cog hit and a
    hallucination; a pair at the threshold (0.8) is not similar (strict >)."""
    table = {frozenset({"hound", "dog"}): 0.85, frozenset({"kitty", "cat"}): 0.9}
    table[frozenset({"kitty", "pet"})] = 0.8

    def fake(a, b):
        return 1.0 if a == b else table.get(frozenset({a, b}), 0.0)

    monkeypatch.setattr(amber_module, "spacy_similarity", lambda model: fake)
    bench = AmberBenchmark(**write_amber(tmp_path))
    bench.read()
    v = bench.judge_description("A hound and a kitty.", ["dog"], ["cat"])
    assert v == {"flags": [False, True], "covered": [True], "cog": [True]}
    exact = AmberBenchmark(**write_amber(tmp_path), similarity="exact")
    exact.read()
    v = exact.judge_description("A hound and a kitty.", ["dog"], ["cat"])
    assert v == {"flags": [True, True], "covered": [False], "cog": [False]}


def test_missing_word_vectors_fail_before_generation_naming_the_install(tmp_path, monkeypatch):
    monkeypatch.setattr(amber_module.importlib.util, "find_spec", lambda name: None)
    bench = AmberBenchmark(**write_amber(tmp_path))
    with pytest.raises(RuntimeError) as info:
        bench.read()
    msg = str(info.value)
    assert "pip install spacy" in msg and "spacy download en_core_web_lg" in msg
    assert "similarity=exact" in msg


def _rewrite(path: str, edit) -> None:
    data = json.loads(Path(path).read_text())
    edit(data)
    Path(path).write_text(json.dumps(data))


def test_read_errors_name_file_row_and_field(tmp_path):
    paths = write_amber(tmp_path)
    _rewrite(paths["annotations"], lambda d: d[4].update(truth="maybe"))
    with pytest.raises(
        DataError,
        match=re.escape(
            "annotations.json: row 4: field 'truth' is 'maybe'; expected 'yes' or 'no'"
        ),
    ):
        AmberBenchmark(**paths, similarity="exact").read()
    paths = write_amber(tmp_path)
    _rewrite(paths["annotations"], lambda d: d[1].update(type="generative-x"))
    with pytest.raises(DataError, match=r"annotations.json: row 1: type 'generative-x' is not"):
        AmberBenchmark(**paths, similarity="exact").read()
    paths = write_amber(tmp_path)
    _rewrite(paths["annotations"], lambda d: d[0]["hallu"].append("unicorn"))
    with pytest.raises(
        DataError,
        match=r"annotations.json: id 1: hallu object 'unicorn' is not a key of .*relation.json",
    ):
        AmberBenchmark(**paths, similarity="exact").read()
    paths = write_amber(tmp_path)
    _rewrite(paths["annotations"], lambda d: d[6].update(id=1005))
    with pytest.raises(DataError, match=r"annotations.json: row 6: id 1005 appears twice"):
        AmberBenchmark(**paths, similarity="exact").read()
    paths = write_amber(tmp_path)
    _rewrite(paths["queries"][1], lambda d: d[2].pop("query"))
    with pytest.raises(
        DataError,
        match=re.escape("query_discriminative.json: row 2: field 'query' is None; expected str"),
    ):
        AmberBenchmark(**paths, similarity="exact").read()
    paths = write_amber(tmp_path)
    _rewrite(paths["queries"][1], lambda d: d[0].update(id=4000))
    with pytest.raises(
        DataError,
        match=r"query_discriminative.json: row 0: id 4000 has no row in .*annotations.json",
    ):
        AmberBenchmark(**paths, similarity="exact").read()
    paths = write_amber(tmp_path)
    paths["queries"] = [paths["queries"][1], paths["queries"][1]]
    with pytest.raises(DataError, match=r"row 0: id 1005 appears twice"):
        AmberBenchmark(**paths).read()
    paths = write_amber(tmp_path)
    (tmp_path / "image" / "AMBER_2.jpg").unlink()
    with pytest.raises(
        DataError, match=r"query_generative.json: row 1: image file not found: .*AMBER_2.jpg"
    ):
        AmberBenchmark(**paths, similarity="exact").read()
    paths = write_amber(tmp_path)
    paths.pop("relation")
    with pytest.raises(DataError, match="generative queries need relation= and safe_words= files"):
        AmberBenchmark(**paths, similarity="exact").read()


def test_release_layout_under_path(tmp_path):
    paths = write_amber(tmp_path)
    data = tmp_path / "data"
    (data / "query").mkdir(parents=True)
    for key in ("annotations", "relation", "safe_words"):
        Path(paths[key]).rename(data / Path(paths[key]).name)
    both = [q for f in paths["queries"] for q in json.loads(Path(f).read_text())]
    (data / "query" / "query_all.json").write_text(json.dumps(both))
    (tmp_path / "image").rename(tmp_path / "images")
    bench = AmberBenchmark(path=str(tmp_path), similarity="exact")
    got = bench.score(bench.read(), {**GEN_ANSWERS, **DIS_ANSWERS})
    assert got["amber/generative/chair"] == 37.5 and got["amber/discriminative/accuracy"] == 62.5
    with pytest.raises(ValueError, match=r"amber: give annotations= \(a file\) or path="):
        AmberBenchmark(queries="q.json", images_dir=".")
