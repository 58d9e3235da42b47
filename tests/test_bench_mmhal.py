"""MMHal-Bench: a hand-written response_template.json rated by a fake OpenAI-compatible judge."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cwdpo.errors import DataError
from cwdpo.metrics.benchmarks.mmhal import MmhalBenchmark, RatingJudge, parse_rating
from cwdpo.metrics.http_judge import HttpJudgeError
from tests.bench_formats import MMHAL_ROWS as ROWS
from tests.bench_formats import MMHAL_SECRET as SECRET
from tests.bench_formats import FakeRatingJudge, write_mmhal


@pytest.fixture()
def judge():
    srv = FakeRatingJudge()
    yield srv
    srv.close()


def test_parse_rating():
    for reply, want in [
        ("Rating: 6", 6), ("rating:5", 5), ("**Rating**: 2", 2), ("**Rating:** 0", 0),
        ("Rating: 3\nRating: 3", 3), ("Rating: 2 Rating: 5", None), ("Rating: 7", None),
        ("Rating: 4.5", None), ("", None), ("I rate it 4.", None),
    ]:  # fmt: skip
        assert parse_rating(reply) == want, reply


def test_mmhal_scores_by_hand_through_the_http_judge(tmp_path, judge, monkeypatch):
    monkeypatch.setenv("MMHAL_KEY", SECRET)
    bench = MmhalBenchmark(
        **write_mmhal(tmp_path), judge=RatingJudge(judge.url, "judge-1", api_key_env="MMHAL_KEY")
    )
    items = bench.read()
    assert [it.id for it in items] == [str(i) for i in range(len(ROWS))]
    assert items[5].images[0].name == "id5.jpg" and items[0].images[0].name == "1000_abc_o.jpg"
    assert items[2].prompt == "Question 2: what colour is the dog?"
    answers = {str(i): answer for i, (_, answer, _, _) in enumerate(ROWS)}
    got = bench.score(items, answers)
    # scores 6 4 1 0 0 3: mean 14/6; below 3: 1 0 0 → 3 of 6; 2 replies unparsed (scored 0)
    assert got == pytest.approx(
        {
            "mmhal/score": 14 / 6,
            "mmhal/hallucination_rate": 50.0,
            "mmhal/unparsed": 2.0,
            "mmhal/adversarial/score": 0.0,
            "mmhal/attribute/score": 5.0,
            "mmhal/counting/score": 0.5,
            "mmhal/holistic/score": 3.0,
        }
    )
    assert bench.replies["3"] == ("I cannot decide.", None)
    assert bench.replies["5"][1] == 3
    assert len(judge.requests) == len(ROWS)
    req = judge.requests[2]
    assert req["auth"] == f"Bearer {SECRET}" and req["body"]["model"] == "judge-1"
    assert req["body"]["temperature"] == 0
    prompt = req["body"]["messages"][-1]["content"]
    for part in (
        "Dog, Grass",
        "Question 2: what colour",
        "Truth 2",
        "Model's answer: BAD",
        "Rating: <0-6>",
    ):
        assert part in prompt, part


def test_custom_rubric_and_judge_failure(tmp_path, judge):
    paths = write_mmhal(tmp_path)
    rubric = "Q: {question}\nModel's answer: {response}\nGive Rating: 0-6"
    bench = MmhalBenchmark(**paths, judge=RatingJudge(judge.url, "m"), rubric=rubric)
    items = bench.read()[:1]
    assert bench.score(items, {"0": "GOOD red"})["mmhal/score"] == 6.0
    assert judge.requests[-1]["body"]["messages"][-1]["content"] == (
        "Q: Question 0: what colour is the dog?\nModel's answer: GOOD red\nGive Rating: 0-6"
    )
    with pytest.raises(ValueError, match=r"placeholders are \['question', 'response', 'score'\]"):
        MmhalBenchmark(
            **paths, judge=RatingJudge(judge.url, "m"), rubric="{question}{response}{score}"
        )
    with pytest.raises(ValueError, match="needs {question} and {response}"):
        MmhalBenchmark(**paths, judge=RatingJudge(judge.url, "m"), rubric="{question} only")
    judge.fail_with = 503
    failing = MmhalBenchmark(**paths, judge=RatingJudge(judge.url, "m", max_retries=0))
    with pytest.raises(HttpJudgeError, match=re.escape(f"{judge.url}/chat/completions") + ".*503"):
        failing.score(items, {"0": "GOOD red"})


def test_read_errors_name_file_row_and_field(tmp_path, judge):
    paths = write_mmhal(tmp_path)
    kw = {"judge": RatingJudge(judge.url, "m")}
    rows = json.loads(Path(paths["template"]).read_text())
    rows[1].pop("question_type")
    Path(paths["template"]).write_text(json.dumps(rows))
    with pytest.raises(
        DataError,
        match=re.escape(
            "response_template.json: row 1: field 'question_type' is None; expected text"
        ),
    ):
        MmhalBenchmark(**paths, **kw).read()
    rows[1]["question_type"] = "attribute"
    rows[2]["image_content"] = "Dog"
    Path(paths["template"]).write_text(json.dumps(rows))
    with pytest.raises(
        DataError, match=r"row 2: field 'image_content' is 'Dog'; expected a list of text"
    ):
        MmhalBenchmark(**paths, **kw).read()
    rows[2]["image_content"] = []
    Path(paths["template"]).write_text(json.dumps(rows))
    (tmp_path / "images" / "1003_abc_o.jpg").unlink()
    with pytest.raises(
        DataError, match=r"row 3: image not found: tried .*1003_abc_o.jpg, .*id3.jpg"
    ):
        MmhalBenchmark(**paths, **kw).read()
    Path(paths["template"]).write_text("{not json")
    with pytest.raises(DataError, match=r"response_template.json is not valid JSON"):
        MmhalBenchmark(**paths, **kw).read()


def test_release_layout_under_path(tmp_path, judge):
    write_mmhal(tmp_path)  # response_template.json and images/ in one folder, as released
    bench = MmhalBenchmark(judge=RatingJudge(judge.url, "m"), path=str(tmp_path))
    assert len(bench.read()) == len(ROWS)
    unjudged = MmhalBenchmark(path=str(tmp_path))  # the runner sets `judge` from mmhal.judge
    with pytest.raises(ValueError, match="mmhal: no judge to rate the answers; set mmhal.judge"):
        unjudged.score(unjudged.read()[:1], {"0": "GOOD red"})
    assert judge.requests == []
    with pytest.raises(ValueError, match=r"mmhal: give template= \(a file\) or path="):
        MmhalBenchmark(judge=RatingJudge(judge.url, "m"), images_dir=".")
