"""`python -m cwdpo.perturb`: LLM-written minimal perturbations, built offline into TRL pairs.

The checks on an answer are pure functions (tested on literal answers); the builder runs
against a fake OpenAI-compatible server on 127.0.0.1 whose answer to each caption is scripted
per attempt (text, an HTTP status, or a delay past the client's timeout), so every path — kept,
re-asked, fallen back, dropped, failed and resumed — is driven deterministically.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cwdpo.data.perturb_items import PAPER_KINDS, kind_for, read_items
from cwdpo.data.perturbation_check import check_perturbation, clean_answer, word_edit_distance
from cwdpo.data.records import normalize
from cwdpo.errors import DataError
from cwdpo.metrics.http_judge import HttpChatError
from cwdpo.run.config_schema import ConfigError
from cwdpo.run.perturb import run_perturb
from tests.formats import UNICODE_CAPTION, write_karpathy, write_trl_jsonl
from tests.helpers import compose_cfg

REPO = Path(__file__).resolve().parent.parent
SECRET = "sk-perturb-SECRET-42"
CAPTION = re.compile(r"^Correct caption: (.*)$", re.M)


# ------------------------------------------------------------------------- answer checks (pure)
@pytest.mark.parametrize(
    "answer, want",
    [
        ("A man riding a blue bike.", "A man riding a blue bike."),
        ('"A man riding a blue bike."', "A man riding a blue bike."),
        ("“A man riding a blue bike.”", "A man riding a blue bike."),
        ("**A man riding a blue bike.**", "A man riding a blue bike."),
        ("Sure! Here is the perturbed caption:\nA man riding a blue bike.", "A man riding a blue bike."),
        ("Here's the rewritten caption:\n\n'A man riding a blue bike.'", "A man riding a blue bike."),
        ("Sure, here it is: A man riding a blue bike.", "A man riding a blue bike."),
        ("Perturbed caption: A man riding a blue bike.", "A man riding a blue bike."),
        ("A man riding a blue bike.\n\nExplanation: I changed red to blue.", "A man riding a blue bike."),
        ("A man riding a blue bike.\nI changed the colour.", "A man riding a blue bike."),
        ("A man riding a blue bike. (changed 'red' to 'blue')", "A man riding a blue bike."),
        ("```\nA man riding a blue bike.\n```", "A man riding a blue bike."),
    ],
)  # fmt: skip
def test_clean_answer_strips_decoration(answer, want):
    got = clean_answer(answer)
    assert got.text == want and got.reason is None
    assert got.stripped == (answer != want)


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("", "empty"),
        ("  \n ", "empty"),
        ('""', "empty"),
        ("A man riding a blue bike.\nA man riding a green bike.", "malformed"),
        ("red -> blue", "malformed"),
        ("A man riding a red → blue bike.", "malformed"),
        ("Option 1: a blue bike\nOption 2: a green bike\nOption 3: a car", "malformed"),
    ],
)  # fmt: skip
def test_clean_answer_refuses_what_it_cannot_separate(answer, reason):
    got = clean_answer(answer)
    assert got.text is None and got.reason == reason


def test_word_edit_distance_by_hand():
    assert word_edit_distance("A man on a red bike.", "a man on a red bike") == 0  # case, punct.
    assert word_edit_distance("a man on a red bike", "a man on a blue bike") == 1
    assert word_edit_distance("a man on a red bike", "two men on a red bike") == 2
    assert word_edit_distance("a clock on top of a tower", "a clock under a tower") == 3
    assert word_edit_distance("a dog", "a big brown dog") == 2
    assert word_edit_distance("", "three words here") == 3


def test_check_perturbation_reasons():
    chosen, refs = "A blue car parked next to a tree.", ["A blue car parked next to a tree.", "a car by a tree"]
    ok = check_perturbation('"A red car parked next to a tree."', chosen, refs, 3)
    assert ok.ok and ok.text == "A red car parked next to a tree." and ok.distance == 1 and ok.stripped
    for answer, reason in [
        ("a blue car, parked next to a TREE", "unchanged"),  # equal after normalisation
        ("A car by a tree!", "reference"),
        ("A red truck parked far away from an old tree.", "too_far"),
        ("", "empty"),
        ("one\ntwo", "malformed"),
    ]:
        v = check_perturbation(answer, chosen, refs, 3)
        assert not v.ok and v.reason == reason, (answer, v)
    assert check_perturbation("A red truck parked next to a big tree.", chosen, refs, 3).ok
    with pytest.raises(ValueError, match="max_edit_words"):
        check_perturbation("x", chosen, refs, 0)


def test_kinds_are_spread_and_stable():
    keys = [f"{i}:0" for i in range(400)]
    counts = Counter(kind_for(k, PAPER_KINDS) for k in keys)
    assert set(counts) == set(PAPER_KINDS) and min(counts.values()) > 60, counts
    assert [kind_for(k, PAPER_KINDS) for k in keys] == [kind_for(k, PAPER_KINDS) for k in keys]


# ------------------------------------------------------------------------- the fake endpoint
def default_answer(caption: str) -> str:
    """A valid one-word perturbation of any caption: its last word replaced."""
    words = caption.rstrip(".!").split()
    words[-1] = "giraffe" if words[-1] == "zebra" else "zebra"
    return " ".join(words) + "."


class FakeLLM:
    """OpenAI-style /chat/completions. `script[caption]` lists what the n-th request for that
    caption gets: a text, an int (HTTP status), ("sleep", s, text) or "block" (wait for
    `release`); past the list (or unscripted) a valid `default_answer`. Checks the key."""

    def __init__(self, key: str | None = SECRET):
        self.script: dict[str, list] = {}
        self.requests: list[dict] = []
        self.seen: Counter[str] = Counter()
        self.release = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    if key is not None and self.headers.get("Authorization") != f"Bearer {key}":
                        return self._send(401, {"error": "bad key"})
                    caption = CAPTION.search(body["messages"][1]["content"]).group(1)
                    with server.lock:
                        n = server.seen[caption]
                        server.seen[caption] += 1
                        server.requests.append({"caption": caption, "n": n, "body": body})
                    steps = server.script.get(caption, [])
                    step = steps[n] if n < len(steps) else default_answer(caption)
                    if step == "block":
                        server.release.wait(60)
                        step = default_answer(caption)
                    if isinstance(step, tuple):
                        time.sleep(step[1])
                        step = step[2]
                    if isinstance(step, int):
                        return self._send(step, {"error": f"status {step}"})
                    message = {"role": "assistant", "content": step}
                    self._send(200, {"choices": [{"index": 0, "message": message}]})
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def llm(monkeypatch):
    monkeypatch.setenv("PERTURB_KEY", SECRET)
    srv = FakeLLM()
    yield srv
    srv.close()


def overrides(llm, out: Path, fx, fmt="karpathy", **kw) -> list[str]:
    args = {
        "input.format": fmt,
        "input.path": str(fx.path),
        "perturb.url": llm.url,
        "perturb.model": "fake-llm",
        "perturb.api_key_env": "PERTURB_KEY",
        "perturb.output": str(out),
        "perturb.backoff": 0.01,
        "perturb.timeout": 5,
        "perturb.concurrency": 3,
    }
    if fx.image_root is not None:
        args["input.image_root"] = str(fx.image_root)
    args.update(kw)
    return [f"{k}={v}" for k, v in args.items()]


def perturb_cfg(tmp_path, args):
    return compose_cfg(args, tmp_path / "hydra", tmp_path / "cache", name="perturb")


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# ------------------------------------------------------------------------- kept / re-asked / fallback
RIDER = "A man riding a red bike down the street."
CAR = "A blue car parked next to a tree."
DOGS = "Three dogs playing in a field."


def test_answers_are_checked_reasked_and_fall_back(tmp_path, llm):
    """Karpathy train rows (restval folded in), one positive each: a good answer, one wrapped in
    a preamble and quotes, one that is identical / reference-equal / a rewrite three times
    (then the rule edit), and one refused once (too far) then kept."""
    fx = write_karpathy(tmp_path / "coco")
    llm.script = {
        RIDER: ["A man riding a blue bike down the street."],
        UNICODE_CAPTION: ['Sure! Here is the perturbed caption:\n"Un café près du pont, 中文标题, with a cat 🐶."'],
        CAR: ["a blue car parked next to a tree", "A car by a tree.", "A red truck parked far away from an old tree."],
        DOGS: ["Two cats sleeping on a couch in the house.", "Three cats playing in a field."],
    }  # fmt: skip
    out = tmp_path / "pairs.jsonl"
    summary = run_perturb(perturb_cfg(tmp_path, overrides(llm, out, fx)))
    rows = {r["chosen"]: r for r in rows_of(out)}
    assert set(rows) == {RIDER, UNICODE_CAPTION, CAR, DOGS}
    assert rows[RIDER]["rejected"] == "A man riding a blue bike down the street."
    assert rows[UNICODE_CAPTION]["rejected"] == "Un café près du pont, 中文标题, with a cat 🐶."
    assert rows[DOGS]["rejected"] == "Three cats playing in a field." and rows[DOGS]["attempts"] == 2
    car = rows[CAR]
    assert car["method"] == "rule" and car["attempts"] == 3 and car["kind"] in PAPER_KINDS
    refs = fx.expected["train"][car["image_id"]]
    assert normalize(car["rejected"]) not in {normalize(r) for r in refs}
    assert word_edit_distance(CAR, car["rejected"]) <= 3
    for r in rows.values():
        assert r["prompt"] == "Describe the image in one sentence." and Path(r["images"][0]).is_file()
        assert r["source"]["format"] == "karpathy" and r["key"] == f"{r['image_id']}:0"
        assert r["kind"] in PAPER_KINDS and r["method"] in ("llm", "rule")
    assert summary["kept"] == 3 and summary["fell_back"] == 1 and summary["retried"] == 2
    assert summary["dropped"] == {} and summary["request_failed"] == {}
    assert summary["rejections"] == {"unchanged": 1, "reference": 1, "too_far": 2}
    assert summary["stripped"] == 1 and summary["answers"] == 1 + 1 + 3 + 2
    assert summary["finished"] and summary["pairs_in_file"] == 4 and summary["rows"] == 4
    assert json.loads(out.with_suffix(".summary.json").read_text()) == summary
    # what the model was asked: the caption, the other references, the kind; a refused answer
    # goes back as the assistant's turn with the reason
    car_reqs = [r["body"] for r in llm.requests if r["caption"] == CAR]
    first = car_reqs[0]["messages"]
    assert first[0]["role"] == "system" and "a car by a tree" in first[1]["content"]
    assert kind_for(car["key"], PAPER_KINDS) in first[1]["content"]
    assert car_reqs[0]["model"] == "fake-llm" and car_reqs[0]["temperature"] == 0.7
    third = car_reqs[2]["messages"]
    assert [m["role"] for m in third] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert third[2]["content"] == "a blue car parked next to a tree"
    assert "means the same as the original caption" in third[3]["content"]
    assert "one of the correct captions" in third[5]["content"]


def test_drop_without_fallback_and_when_no_rule_edit_exists(tmp_path, llm):
    """fallback=drop drops a row refused `attempts` times; with the rule fallback a caption
    with no swappable word is dropped too; both are recorded, so a rerun does not ask again."""
    rows = [
        {"images": ["img_0.png"], "prompt": "Describe.", "chosen": "Nothing to see here.", "rejected": "No."},
        {"images": ["img_1.png"], "prompt": "Describe.", "chosen": "A red square.", "rejected": "A dog."},
        {"images": ["img_2.png"], "prompt": "Describe.", "chosen": "A green square.", "rejected": "A cat."},
    ]  # fmt: skip
    fx = write_trl_jsonl(tmp_path, rows=rows)
    llm.script = {r["chosen"]: [r["chosen"]] * 2 for r in rows[:2]}  # always unchanged
    out = tmp_path / "rule.jsonl"
    s = run_perturb(perturb_cfg(tmp_path, overrides(llm, out, fx, "trl", **{"perturb.attempts": 2})))
    assert s["dropped"] == {"no_rule_edit": 1} and s["fell_back"] == 1 and s["kept"] == 1
    kept = {r["chosen"]: r for r in rows_of(out)}
    assert kept["A red square."]["rejected"] == "A green square." and kept["A red square."]["kind"] == "attribute"
    dropped = rows_of(tmp_path / "rule.dropped.jsonl")
    assert [(d["key"], d["reason"], d["rejections"]) for d in dropped] == [("row0", "no_rule_edit", ["unchanged"] * 2)]
    out2 = tmp_path / "drop.jsonl"
    llm.seen.clear()  # the same script again
    args = overrides(llm, out2, fx, "trl", **{"perturb.attempts": 2, "perturb.fallback": "drop"})
    s2 = run_perturb(perturb_cfg(tmp_path, args))
    assert s2["dropped"] == {"rejected:unchanged": 2} and s2["kept"] == 1 and s2["fell_back"] == 0
    n = len(llm.requests)
    again = run_perturb(perturb_cfg(tmp_path, args))  # everything is done: nothing is asked
    assert len(llm.requests) == n and again["this_run"] == 0 and again["done_before"] == 3
    assert again["pairs_in_file"] == 1 and again["dropped_in_file"] == 2
