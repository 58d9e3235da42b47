"""MMHal-Bench: a hand-written response_template.json rated by a fake OpenAI-compatible judge."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from cwdpo.errors import DataError
from cwdpo.metrics.benchmarks.mmhal import MmhalBenchmark, parse_rating
from cwdpo.metrics.http_judge import HttpJudgeError

SECRET = "sk-test-MMHAL-123"
# (question_type, model answer, the fake judge's reply, the score it is worth)
ROWS = [
    ("attribute", "GOOD red", "The answer matches.\nRating: 6", 6),
    ("attribute", "OK", "Correct but terse. **Rating:** 4", 4),
    ("counting", "BAD", "It invents a third dog. Rating: 1", 1),
    ("counting", "GARBAGE", "I cannot decide.", 0),  # unparsed: no rating → 0
    ("adversarial", "TWO", "Rating: 2, or maybe Rating: 5", 0),  # unparsed: two ratings → 0
    ("holistic", "SAME", "Rating: 3. Final Rating: 3", 3),  # the same rating twice is one
]


class FakeJudge:
    """/v1/chat/completions answering by the model answer shown in the rubric prompt."""

    def __init__(self):
        self.requests: list[dict] = []
        self.fail_with: int | None = None
        replies = {answer: reply for _, answer, reply, _ in ROWS}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"auth": self.headers.get("Authorization"), "body": body})
                if server.fail_with:
                    return self._send(server.fail_with, {"error": "down"})
                prompt = body["messages"][-1]["content"]
                answer = re.search(r"^Model's answer: (.*)$", prompt, re.M).group(1)
                message = {"role": "assistant", "content": replies.get(answer, "Rating: 5")}
                self._send(200, {"choices": [{"message": message}]})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def judge():
    srv = FakeJudge()
    yield srv
    srv.close()


def write_mmhal(root: Path) -> dict:
    (root / "images").mkdir(exist_ok=True)
    rows = []
    for i, (kind, *_rest) in enumerate(ROWS):
        name = f"{1000 + i}_abc_o.jpg"
        rows.append(
            {
                "question_type": kind,
                "question_topic": "animal",
                "image_id": f"id{i}",
                "image_src": f"https://c1.staticflickr.com/5/{name}",
                "image_content": ["Dog", "Grass"],
                "question": f"Question {i}: what colour is the dog?",
                "gt_answer": f"Truth {i}",
                "model_answer": "",
            }
        )
        # row 5's image is stored under its image_id (the fallback name)
        file = f"id{i}.jpg" if i == 5 else name
        Image.new("RGB", (4, 4), (i * 30, 0, 0)).save(root / "images" / file)
    path = root / "response_template.json"
    path.write_text(json.dumps(rows, indent=1))
    return {"template": str(path), "images_dir": str(root / "images")}


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
        **write_mmhal(tmp_path), judge_url=judge.url, judge_model="judge-1", api_key_env="MMHAL_KEY"
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
    bench = MmhalBenchmark(**paths, judge_url=judge.url, judge_model="m", rubric=rubric)
    items = bench.read()[:1]
    assert bench.score(items, {"0": "GOOD red"})["mmhal/score"] == 6.0
    assert judge.requests[-1]["body"]["messages"][-1]["content"] == (
        "Q: Question 0: what colour is the dog?\nModel's answer: GOOD red\nGive Rating: 0-6"
    )
    with pytest.raises(ValueError, match=r"placeholders are \['question', 'response', 'score'\]"):
        MmhalBenchmark(
            **paths, judge_url=judge.url, judge_model="m", rubric="{question}{response}{score}"
        )
    with pytest.raises(ValueError, match="needs {question} and {response}"):
        MmhalBenchmark(**paths, judge_url=judge.url, judge_model="m", rubric="{question} only")
    judge.fail_with = 503
    failing = MmhalBenchmark(**paths, judge_url=judge.url, judge_model="m", max_retries=0)
    with pytest.raises(HttpJudgeError, match=re.escape(f"{judge.url}/chat/completions") + ".*503"):
        failing.score(items, {"0": "GOOD red"})


def test_read_errors_name_file_row_and_field(tmp_path, judge):
    paths = write_mmhal(tmp_path)
    kw = {"judge_url": judge.url, "judge_model": "m"}
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
    bench = MmhalBenchmark(judge_url=judge.url, judge_model="m", path=str(tmp_path))
    assert len(bench.read()) == len(ROWS)
    with pytest.raises(ValueError, match=r"mmhal: give template= \(a file\) or path="):
        MmhalBenchmark(judge_url=judge.url, judge_model="m", images_dir=".")
