"""The benchmarks' readers and official scoring rules on hand-written fixtures (no model):
POPE's yes/no rule and metrics, MMMU's parser (brackets, "X ", "X.", option text, last match,
seeded fallback, open numbers with units and commas), MMBench's can_infer and CircularEval.
Every expected number is counted by hand in the comments."""

from __future__ import annotations

import pytest

from cwdpo.errors import DataError
from cwdpo.metrics.benchmarks.mmbench import MMBench, can_infer, judge_letter
from cwdpo.metrics.benchmarks.mmmu import MMMU
from cwdpo.metrics.benchmarks.mmmu_parse import (
    open_correct,
    parse_multi_choice,
    parse_open,
)
from cwdpo.metrics.benchmarks.pope import POPE, pope_answer
from cwdpo.metrics.benchmarks.registry import BENCHMARKS, build_benchmark
from tests.bench_formats import (
    mmbench_answers,
    mmmu_answers,
    pope_answers,
    write_mmbench,
    write_mmmu,
    write_pope,
    write_pope_parquet,
)

# ---------------------------------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes, there is a dog.", "yes"),
        ("No.", "no"),
        ("There is no cat", "no"),
        ("I don't know", "yes"),  # no negation *word*: the official rule reads yes
        ("Not that I can see.", "yes"),  # "Not" is not in {No, no, not}
        ("no, it is not there", "no"),
        ("Yes. But no dog.", "yes"),  # only the first sentence counts
        ("NO", "yes"),
    ],
)
def test_pope_official_answer_rule(text, expected):
    assert pope_answer(text) == expected


# per split (yes = positive), from POPE_ROWS:
#   random: TP 1 (dog), TN 2 (No., no cat), FP 1 (don't know)  → acc 75, P 50, R 100, yes 50
#   popular: TP 1 ("Not that..."), FN 1                          → acc 50, P 100, R 50, yes 50
#   adversarial: FP 1 ("Yes. But no dog."), TP 1                  → acc 50, P 50, R 100, yes 100
#   all: TP 3, FP 2, TN 2, FN 1 → acc 62.5, P 60, R 75, F1 2·.6·.75/1.35, yes 62.5
POPE_EXPECTED = {
    "pope/random/accuracy": 75.0,
    "pope/random/precision": 50.0,
    "pope/random/recall": 100.0,
    "pope/random/f1": 100 * 2 / 3,
    "pope/random/yes_ratio": 50.0,
    "pope/popular/accuracy": 50.0,
    "pope/popular/precision": 100.0,
    "pope/popular/recall": 50.0,
    "pope/popular/f1": 100 * 2 / 3,
    "pope/popular/yes_ratio": 50.0,
    "pope/adversarial/accuracy": 50.0,
    "pope/adversarial/precision": 50.0,
    "pope/adversarial/recall": 100.0,
    "pope/adversarial/yes_ratio": 100.0,
    "pope/all/accuracy": 62.5,
    "pope/all/precision": 60.0,
    "pope/all/recall": 75.0,
    "pope/all/f1": 100 * 2 * 0.6 * 0.75 / 1.35,
    "pope/all/yes_ratio": 62.5,
    "pope/mean/accuracy": (75 + 50 + 50) / 3,
    "pope/mean/yes_ratio": (50 + 50 + 100) / 3,
}


def _check(res, expected):
    for k, v in expected.items():
        assert res[k] == pytest.approx(v), k


def test_pope_jsonl_scores_by_hand(tmp_path):
    root, images = write_pope(tmp_path)
    bench = POPE(path=str(root), image_root=str(images))
    items = bench.read()
    assert [it.id for it in items][:2] == ["adversarial/1", "adversarial/2"]
    assert items[0].prompt == (
        "Is there a fork in the image?\nAnswer the question using a single word or phrase."
    )
    assert items[0].images[0].load().size == (24, 24)
    _check(bench.score(items, pope_answers()), POPE_EXPECTED)


def test_pope_parquet_reads_the_same_items(tmp_path):
    jsonl_root, images = write_pope(tmp_path / "j")
    pq = write_pope_parquet(tmp_path / "p")
    a = POPE(path=str(jsonl_root), image_root=str(images)).read()
    b = POPE(path=str(pq.parent.parent)).read()
    key = sorted((it.id, it.prompt, it.meta["label"]) for it in a)
    assert sorted((it.id, it.prompt, it.meta["label"]) for it in b) == key
    _check(POPE(path=str(pq)).score(b, pope_answers()), POPE_EXPECTED)


def test_pope_one_split_and_errors(tmp_path):
    root, images = write_pope(tmp_path)
    bench = POPE(path=str(root), image_root=str(images), splits=["popular"])
    items = bench.read()
    assert {it.meta["split"] for it in items} == {"popular"}
    res = bench.score(items, pope_answers())
    assert res["pope/mean/accuracy"] == res["pope/popular/accuracy"] == 50.0
    with pytest.raises(DataError, match="no answer for 1 of 2 item.*popular/2"):
        bench.score(items, {"popular/1": "yes"})
    (root / "coco_pope_random.json").write_text('{"question_id": 1, "image": "x.jpg"}\n')
    with pytest.raises(DataError, match=r"coco_pope_random.json: line 1: missing field.*text"):
        POPE(path=str(root), image_root=str(images)).read()
    with pytest.raises(DataError, match="image_root"):
        POPE(path=str(root / "coco_pope_popular.json")).read()
    with pytest.raises(ValueError, match="unknown split"):
        POPE(path=str(root), splits=["rare"])


# ---------------------------------------------------------------------------------------- MMMU


@pytest.mark.parametrize(
    "response, expected",
    [
        ("(B)", "B"),
        ("B", "B"),
        ("B.", "B"),  # edge punctuation stripped, then "B "
        ("The answer is C because the sky is blue", "C"),
        ("I think there are seven pears in the picture", "B"),  # option text (> 5 words)
        ("seven pears", None),  # option text only counts in longer answers: random fallback
        ("A or B", "B"),  # two letters: the last one wins
        ("(A) is wrong, (C) is right", "C"),  # brackets: the last bracketed one
        ("It is 4 apples, no wait, it is seven pears", "B"),  # two option texts: the last
    ],
)
def test_mmmu_multiple_choice_parser(response, expected):
    options = ["4 apples", "seven pears", "a circle", "nine"]
    got = parse_multi_choice(response, options, seed=42, item_id="q")
    if expected is None:  # the fallback: seeded, reproducible, a real option
        assert got == parse_multi_choice(response, options, seed=42, item_id="q") in "ABCD"
    else:
        assert got == expected


def test_mmmu_random_fallback_is_seeded_per_item():
    import random

    opts = ["a", "b", "c", "d"]
    picks = {parse_multi_choice("hmm", opts, seed=s, item_id="x") for s in range(20)}
    assert len(picks) > 1  # it is random across seeds ...
    for s in range(5):  # ... and the draw of Random(f"{seed}:{id}")
        assert parse_multi_choice("hmm", opts, seed=s, item_id="x") == random.Random(
            f"{s}:x"
        ).choice("ABCD")


@pytest.mark.parametrize(
    "gold, response, ok",
    [
        ("12.5", "The speed is 12.5 m/s", True),  # a number with a unit
        ("1,000", "1000 kg", True),  # thousands comma in the gold
        ("1000", "the mass is 1,000 kg", True),  # ... and in the answer
        ("3", "about 5 meters", False),
        ("0.33", "x = 0.333", True),  # rounded to 2 decimals
        ("Paris", "The capital is Paris.", True),  # string: gold inside the answer
        ("b", "abc", False),  # one-character gold must be a word edge
        (["24", "24.0"], "24", True),  # a list of accepted answers
    ],
)
def test_mmmu_open_matching(gold, response, ok):
    assert open_correct(gold, parse_open(response)) is ok


# MMMU_ROWS: Art_1 "(B)" ✗ (A); Art_2 "C" ✓; Math_3 option text B ✓; Math_4 "A or B" → B ✗;
# Math_5 "hmm" → Random("42:validation_Math_5") = D ✓ (seed 7: B ✗); Physics_6 12.5 m/s ✓;
# Physics_7 1000 kg = 1,000 ✓; Physics_8 5 ≠ 3 ✗.  → 5/8; Art 1/2; Math 2/3; Physics 2/3
def test_mmmu_scores_by_hand(tmp_path):
    bench = MMMU(path=str(write_mmmu(tmp_path)))
    items = bench.read()
    assert len(items) == 8
    art2 = next(it for it in items if it.id == "validation_Art_2")
    assert len(art2.images) == 1 and art2.prompt.startswith("What is in <image 1>?\nA. red\n")
    assert art2.prompt.endswith(
        "\n\nAnswer with the option's letter from the given choices directly."
    )
    phys = next(it for it in items if it.id == "validation_Physics_6")
    assert phys.prompt.endswith("?\n\nAnswer the question using a single word or phrase.")
    res = bench.score(items, mmmu_answers())
    _check(
        res,
        {
            "mmmu/accuracy": 62.5,
            "mmmu/accuracy/multiple-choice": 60.0,
            "mmmu/accuracy/open": 100 * 2 / 3,
            "mmmu/subject/Art": 50.0,
            "mmmu/subject/Math": 100 * 2 / 3,
            "mmmu/subject/Physics": 100 * 2 / 3,
            "mmmu/discipline/Art and Design": 50.0,
            "mmmu/discipline/Science": 100 * 4 / 6,
        },
    )
    other = MMMU(path=str(tmp_path), seed=7).score(items, mmmu_answers())
    assert other["mmmu/accuracy"] == 50.0 and other["mmmu/subject/Math"] == pytest.approx(100 / 3)


# ------------------------------------------------------------------------------------- MMBench


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("A", "A"),
        ("(D)", "D"),
        ("The answer is C because it is red", "C"),
        ("red", "B"),  # option text
        ("A or B", None),  # two letters
        ("I don't know", None),  # none
        ("Cannot determine the answer", "Z"),  # a refusal
        ("There are yellow and red", None),  # two option texts
    ],
)
def test_mmbench_can_infer(answer, expected):
    assert can_infer(answer, {"A": "yellow", "B": "red", "C": "green", "D": "blue"}) == expected


# MMBENCH_ROWS: question 0 (4 rotations: "A", "(D)", "... C because", "red") all ✓; question 1
# rotation 1000001 ✗; 2 two letters (unparsed ✗); 3 nothing (unparsed ✗); 4 text "three" ✓.
# circular: 2/5 = 40; color 1/2, scene 0/2, count 1/1; vanilla rows 0,1,2,3,4: 3/5 = 60;
# unparsed 2/9 rows.
def test_mmbench_circular_by_hand(tmp_path):
    bench = MMBench(path=str(write_mmbench(tmp_path)))
    items = bench.read()
    assert items[0].prompt == (
        "Main colour?\nA. red\nB. green\nC. blue\nD. yellow\n"
        "Answer with the option's letter from the given choices directly."
    )
    res = bench.score(items, mmbench_answers())
    _check(
        res,
        {
            "mmbench/overall": 40.0,
            "mmbench/category/color": 50.0,
            "mmbench/category/scene": 0.0,
            "mmbench/category/count": 100.0,
            "mmbench/l2/l2_color": 50.0,
            "mmbench/vanilla": 60.0,
            "mmbench/unparsed": 100 * 2 / 9,
            "mmbench/n_questions": 5.0,
            "mmbench/n_rows": 9.0,
        },
    )


class _StubJudge:
    """Picks B for everything it is asked (the judge hook, without a network)."""

    def __init__(self):
        self.asked = []

    def choose(self, question, options, prediction):
        self.asked.append(prediction)
        return "B"


def test_mmbench_judge_reads_only_unparseable_answers(tmp_path):
    bench = MMBench(path=str(write_mmbench(tmp_path)))
    bench.judge = _StubJudge()
    res = bench.score(bench.read(), mmbench_answers())
    assert bench.judge.asked == ["A or B", "I don't know"]
    # questions 2 and 3 (answer B) become right: 4/5
    assert res["mmbench/overall"] == 80.0 and res["mmbench/unparsed"] == 0.0
    assert res["mmbench/judged"] == 2.0


def test_judge_reply_parsing():
    assert judge_letter("B", ["A", "B"]) == "B"
    assert judge_letter("Z", ["A", "B"]) == "Z"
    assert judge_letter("The answer is (A).", ["A", "B"]) == "A"
    assert judge_letter("A or B", ["A", "B"]) is None


def test_registry_builds_from_config_nodes(tmp_path):
    assert set(BENCHMARKS) >= {"pope", "mmmu", "mmbench"}
    b = build_benchmark("mmbench", {"path": "x.tsv", "max_new_tokens": 7, "limit": 2})
    assert isinstance(b, MMBench) and b.max_new_tokens == 7
    with pytest.raises(ValueError, match="mmmu.path="):
        build_benchmark("mmmu", {"path": None})
    with pytest.raises(ValueError, match="bad config key"):
        build_benchmark("mmbench", {"path": "x.tsv", "pathh": 1})
