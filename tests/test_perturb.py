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
from collections import Counter
from pathlib import Path

import pytest

from cwdpo.data.perturb_items import PAPER_KINDS, kind_for, read_items
from cwdpo.data.perturbation_check import check_perturbation, clean_answer, word_edit_distance
from cwdpo.data.records import normalize
from cwdpo.errors import DataError
from cwdpo.metrics.http_judge import HttpChatError
from cwdpo.run.config_schema import ConfigError
from cwdpo.run.perturb import run_perturb
from tests.fake_openai import FakeChatServer, chat_reply
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
        ('"Stop" sign on a green pole.', '"Stop" sign on a green pole.'),
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
        ('"A man riding a blue bike.', "malformed"),
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
    chosen, refs = (
        "A blue car parked next to a tree.",
        ["A blue car parked next to a tree.", "a car by a tree"],
    )
    ok = check_perturbation('"A red car parked next to a tree."', chosen, refs, 3)
    assert (
        ok.ok and ok.text == "A red car parked next to a tree." and ok.distance == 1 and ok.stripped
    )
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


class FakeLLM(FakeChatServer):
    """OpenAI-style /chat/completions. `script[caption]` lists what the n-th request for that
    caption gets: a text, an int (HTTP status), {"status", "retry_after"} (a status with a
    Retry-After header), ("sleep", s, text) or "block" (wait for
    `release`); past the list (or unscripted) a valid `default_answer`. Checks the key."""

    def __init__(self, key: str | None = SECRET):
        self.key = key
        self.script: dict[str, list] = {}
        self.requests: list[dict] = []
        self.seen: Counter[str] = Counter()
        self.release = threading.Event()
        self.lock = threading.Lock()
        super().__init__()

    def reply(self, body, headers, path):
        if self.key is not None and headers.get("Authorization") != f"Bearer {self.key}":
            return 401, {"error": "bad key"}
        caption = CAPTION.search(body["messages"][1]["content"]).group(1)
        with self.lock:
            n = self.seen[caption]
            self.seen[caption] += 1
            self.requests.append({"caption": caption, "n": n, "body": body, "t": time.monotonic()})
        steps = self.script.get(caption, [])
        step = steps[n] if n < len(steps) else default_answer(caption)
        if step == "block":
            self.release.wait(60)
            step = default_answer(caption)
        if isinstance(step, tuple):
            time.sleep(step[1])
            step = step[2]
        if isinstance(step, int):
            return step, {"error": f"status {step}"}
        if isinstance(step, dict):  # a status with a Retry-After header
            return step["status"], {"error": "slow down"}, {"Retry-After": step["retry_after"]}
        return chat_reply(step)

    def close(self):
        self.release.set()
        super().close()


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


def test_answers_are_checked_reasked_and_fall_back(tmp_path, llm, capsys):
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
    bar = capsys.readouterr().err.splitlines()[-1]  # the progress bar's final state
    assert re.search(r"4/4 .* rows/s, kept 3 rule 1 dropped 0 failed 0", bar), bar
    assert "refused: reference=1 too_far=2 unchanged=1" in bar
    rows = {r["chosen"]: r for r in rows_of(out)}
    assert set(rows) == {RIDER, UNICODE_CAPTION, CAR, DOGS}
    assert rows[RIDER]["rejected"] == "A man riding a blue bike down the street."
    assert rows[UNICODE_CAPTION]["rejected"] == "Un café près du pont, 中文标题, with a cat 🐶."
    assert (
        rows[DOGS]["rejected"] == "Three cats playing in a field." and rows[DOGS]["attempts"] == 2
    )
    car = rows[CAR]
    assert car["method"] == "rule" and car["attempts"] == 3 and car["kind"] in PAPER_KINDS
    refs = fx.expected["train"][car["image_id"]]
    assert normalize(car["rejected"]) not in {normalize(r) for r in refs}
    assert word_edit_distance(CAR, car["rejected"]) <= 3
    for r in rows.values():
        assert (
            r["prompt"] == "Describe the image in one sentence." and Path(r["images"][0]).is_file()
        )
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
    assert [m["role"] for m in third] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
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
    s = run_perturb(
        perturb_cfg(tmp_path, overrides(llm, out, fx, "trl", **{"perturb.attempts": 2}))
    )
    assert s["dropped"] == {"no_rule_edit": 1} and s["fell_back"] == 1 and s["kept"] == 1
    kept = {r["chosen"]: r for r in rows_of(out)}
    assert (
        kept["A red square."]["rejected"] == "A green square."
        and kept["A red square."]["kind"] == "attribute"
    )
    dropped = rows_of(tmp_path / "rule.dropped.jsonl")
    assert [(d["key"], d["reason"], d["rejections"]) for d in dropped] == [
        ("row0", "no_rule_edit", ["unchanged"] * 2)
    ]
    out2 = tmp_path / "drop.jsonl"
    llm.seen.clear()  # the same script again
    args = overrides(llm, out2, fx, "trl", **{"perturb.attempts": 2, "perturb.fallback": "drop"})
    s2 = run_perturb(perturb_cfg(tmp_path, args))
    assert s2["dropped"] == {"rejected:unchanged": 2} and s2["kept"] == 1 and s2["fell_back"] == 0
    n = len(llm.requests)
    again = run_perturb(perturb_cfg(tmp_path, args))  # everything is done: nothing is asked
    assert len(llm.requests) == n and again["this_run"] == 0 and again["done_before"] == 3
    assert again["pairs_in_file"] == 1 and again["dropped_in_file"] == 2


# ------------------------------------------------------------------------- the service misbehaves
def test_429_5xx_and_timeouts_are_retried_then_left_for_the_rerun(tmp_path, llm):
    """429 (asking, by Retry-After, for a longer wait than the back-off) and 503 then success, a
    reply slower than the timeout then success: kept, each retry counted; a caption that always times out fails after max_retries, is not recorded, and the
    rerun (server healthy again) completes the file without duplicates."""
    fx = write_karpathy(tmp_path / "coco")
    late = ("sleep", 1.0, "too late")
    wait = {"status": 429, "retry_after": "0.5"}
    llm.script = {RIDER: [wait], UNICODE_CAPTION: [503, 502], CAR: [late], DOGS: [late] * 3}
    out = tmp_path / "pairs.jsonl"
    args = overrides(llm, out, fx, **{"perturb.timeout": 0.3, "perturb.max_retries": 2})
    s = run_perturb(perturb_cfg(tmp_path, args))
    assert s["http_retries"] == {"http_429": 1, "http_502": 1, "http_503": 1, "timeout": 3}
    assert s["request_failed"] == {"request:timeout": 1} and s["kept"] == 3 and s["finished"]
    assert s["retried"] == 0  # retries of a request are not re-asked answers
    assert {r["chosen"] for r in rows_of(out)} == {RIDER, UNICODE_CAPTION, CAR}
    assert not (tmp_path / "pairs.dropped.jsonl").exists()
    assert llm.seen[DOGS] == 3  # 1 + max_retries
    t0, t1 = (r["t"] for r in llm.requests if r["caption"] == RIDER)
    assert t1 - t0 >= 0.45  # Retry-After honoured (the back-off alone is 0.01 s)
    llm.script[DOGS] = []
    again = run_perturb(perturb_cfg(tmp_path, args))
    assert again["done_before"] == 3 and again["this_run"] == 1 and again["kept"] == 1
    rows = rows_of(out)
    assert sorted(r["chosen"] for r in rows) == sorted([RIDER, UNICODE_CAPTION, CAR, DOGS])
    assert len({r["key"] for r in rows}) == 4


def test_client_errors_stop_the_run_without_leaking_the_key(tmp_path, llm, monkeypatch):
    """A wrong key (401) would fail every row alike: the run stops at the first, says why, and
    never shows the key; the summary is still written."""
    fx = write_karpathy(tmp_path / "coco")
    monkeypatch.setenv("PERTURB_KEY", "sk-wrong-KEY-987")
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(HttpChatError, match="401") as info:
        run_perturb(perturb_cfg(tmp_path, overrides(llm, out, fx, **{"perturb.concurrency": 1})))
    assert "sk-wrong-KEY-987" not in str(info.value) and "/chat/completions" in str(info.value)
    s = json.loads((tmp_path / "pairs.summary.json").read_text())
    assert not s["finished"] and s["request_failed"] == {"request:http_401": 1}
    assert rows_of(out) == [] and len(llm.requests) == 0  # refused before the handler counted


def test_a_service_that_keeps_failing_stops_the_run(tmp_path, llm):
    """5xx on every request: after `max_consecutive_failures` failed rows the run stops (with
    the summary), instead of spending the retries of every remaining row."""
    fx = write_karpathy(tmp_path / "coco")
    llm.script = {c: [503] * 2 for c in (RIDER, UNICODE_CAPTION, CAR, DOGS)}
    extra = {
        "perturb.max_retries": 0,
        "perturb.concurrency": 1,
        "perturb.max_consecutive_failures": 2,
    }
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(HttpChatError, match=r"stopping, 2 rows in a row failed .*HTTP 503"):
        run_perturb(perturb_cfg(tmp_path, overrides(llm, out, fx, **extra)))
    s = json.loads((tmp_path / "pairs.summary.json").read_text())
    assert s["request_failed"] == {"request:http_503": 2} and not s["finished"]
    assert len(llm.requests) == 2 and rows_of(out) == []


def test_config_errors_name_the_key(tmp_path, llm, monkeypatch):
    fx = write_karpathy(tmp_path / "coco")
    out = tmp_path / "pairs.jsonl"
    base = overrides(llm, out, fx)
    for extra, msg in [
        (["perturb.model=???"], r"perturb.model is required"),
        (["perturb.concurrency=0"], r"perturb.concurrency=0: expected an integer >= 1"),
        (["perturb.fallback=guess"], r"perturb.fallback='guess': expected one of \['rule', 'drop'\]"),
        (["input.format=coco"], r"input.format='coco': expected one of"),
        (["perturb.prompt='Perturb {captoin}'"], r"unknown placeholder\(s\) \['captoin'\]"),
        (["perturb.prompt=Perturb it."], r"perturb.prompt: must contain \{caption\}"),
        (["perturb.kinds=null"], r"perturb.kinds: expected a non-empty mapping"),
        (["perturb.api_key_env=NO_SUCH_KEY_ENV"], r"environment variable NO_SUCH_KEY_ENV is not set"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=msg):
            run_perturb(perturb_cfg(tmp_path, [*base, *extra]))
    assert llm.requests == [] and not out.exists()
    # a local server without auth: no key, no Authorization header
    monkeypatch.delenv("PERTURB_KEY")
    srv = FakeLLM(key=None)
    try:
        s = run_perturb(
            perturb_cfg(tmp_path, [*overrides(srv, out, fx), "perturb.api_key_env=null"])
        )
        assert s["kept"] == 4
    finally:
        srv.close()


def test_max_rows_caps_the_cost_and_the_rerun_goes_on(tmp_path, llm):
    fx = write_karpathy(tmp_path / "coco")
    out = tmp_path / "pairs.jsonl"
    args = [*overrides(llm, out, fx), "input.captions_per_image=2"]  # 2+2+2+1 positives
    s = run_perturb(perturb_cfg(tmp_path, [*args, "perturb.max_rows=3"]))
    assert s["rows"] == 7 and s["this_run"] == 3 and s["left_by_max_rows"] == 4
    assert len(rows_of(out)) == 3 and len(llm.requests) == 3
    s = run_perturb(perturb_cfg(tmp_path, args))
    assert s["done_before"] == 3 and s["this_run"] == 4 and s["pairs_in_file"] == 7
    keys = [r["key"] for r in rows_of(out)]
    assert len(keys) == len(set(keys)) == 7 and len(llm.requests) == 7


def test_an_output_of_another_input_or_a_corrupt_line_is_refused(tmp_path, llm):
    fx = write_karpathy(tmp_path / "coco")
    other = write_karpathy(tmp_path / "flickr", dataset="flickr30k")
    out = tmp_path / "pairs.jsonl"
    run_perturb(perturb_cfg(tmp_path, overrides(llm, out, fx)))
    with pytest.raises(DataError, match=r"pairs.jsonl: row 1 was built from .*dataset_coco.json"):
        run_perturb(perturb_cfg(tmp_path, overrides(llm, out, other)))
    lines = out.read_text().splitlines()
    out.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl: line 2: invalid JSON"):
        run_perturb(perturb_cfg(tmp_path, overrides(llm, out, fx)))


# ------------------------------------------------------------------------- a kill, then resume
@pytest.mark.subprocess
def test_killed_mid_run_then_resumed_loses_and_repeats_nothing(tmp_path, llm):
    """The CLI in a subprocess: 3 rows are answered, every later request blocks; the process is
    SIGKILLed once the file holds 3 rows, a torn half line is appended as a crash mid-write would
    leave it; the rerun cuts it, asks only for the rows not written, and the file ends with every
    row exactly once."""
    fx = write_karpathy(tmp_path / "coco")
    items = read_items("karpathy", fx.path, fx.image_root, captions_per_image=2)
    first = [it.chosen for it in items[:3]]
    llm.script = {it.chosen: ["block"] for it in items[3:]}
    out = tmp_path / "pairs.jsonl"
    args = [*overrides(llm, out, fx), "input.captions_per_image=2", "perturb.concurrency=2"]
    args += [f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PERTURB_KEY": SECRET}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cwdpo.perturb", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while len(rows_of(out)) < 3 or len(llm.requests) < 5:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the subprocess did not write 3 rows in time"
            time.sleep(0.05)
        time.sleep(0.2)  # nothing more is written while the remaining requests block
        assert len(rows_of(out)) == 3
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert {r["chosen"] for r in rows_of(out)} == set(first)
    with out.open("a") as f:
        f.write('{"key": "torn", "chosen": "half a li')
    llm.release.set()
    seen_before = Counter(llm.seen)
    s = run_perturb(perturb_cfg(tmp_path, args[:-1]))
    rows = rows_of(out)
    assert sorted(r["key"] for r in rows) == sorted(it.key for it in items)  # each exactly once
    assert s["done_before"] == 3 and s["this_run"] == 4 and s["kept"] == 4
    asked = Counter(llm.seen) - seen_before
    assert set(asked) == {it.chosen for it in items[3:]} and not set(asked) & set(first)


# ------------------------------------------------------------------------- sources and training
def test_trl_and_nocaps_sources(tmp_path, llm):
    from tests.formats import write_nocaps

    fx = write_trl_jsonl(tmp_path / "trl", conversational_format=True)
    out = tmp_path / "trl_pairs.jsonl"
    s = run_perturb(perturb_cfg(tmp_path, overrides(llm, out, fx, "trl")))
    assert s["kept"] == 4
    rows = rows_of(out)
    assert sorted(r["key"] for r in rows) == [f"row{i}" for i in range(4)]
    by_key = {r["key"]: r for r in rows}
    for i, (prompt, chosen, _) in enumerate(fx.expected["texts"]):
        r = by_key[f"row{i}"]
        assert (r["prompt"], r["chosen"]) == (prompt, chosen)
        assert r["rejected"] == default_answer(chosen) and r["source"]["row"] == i
        assert r["images"] == [str(fx.expected["images"][i].resolve())]
    # a `save_to_disk` dataset: images held as bytes are written once beside the output
    from PIL import Image

    from tests.formats import write_trl_hf_dataset

    hf = write_trl_hf_dataset(tmp_path / "hf")
    out = tmp_path / "hf_pairs.jsonl"
    assert run_perturb(perturb_cfg(tmp_path, overrides(llm, out, hf, "trl")))["kept"] == 4
    rows = sorted(rows_of(out), key=lambda r: r["key"])
    for r, pixel in zip(rows, hf.expected["pixels"]):
        path = Path(r["images"][0])
        assert path.parent == tmp_path / "hf_pairs_images" and path.suffix == ".png"
        assert Image.open(path).convert("RGB").getpixel((5, 0)) == pixel
    nc = write_nocaps(tmp_path / "nocaps")
    out = tmp_path / "nocaps_pairs.jsonl"
    s = run_perturb(perturb_cfg(tmp_path, overrides(llm, out, nc, "nocaps")))
    rows = rows_of(out)
    assert s["kept"] == 6 and {r["source"]["domain"] for r in rows} == {
        "in-domain",
        "near-domain",
        "out-domain",
    }


def test_a_short_pipeline_trains_on_the_written_pairs(tmp_path, llm, tiny_cache_dir):
    """Every positive of the Karpathy fixture (17) through the fake server, then
    `data=trl_pairs data.path=<output>` trains SFT-C and CW-DPO on the file as written."""
    from cwdpo.run.pipeline import run_pipeline

    fx = write_karpathy(tmp_path / "coco")
    out = tmp_path / "pairs.jsonl"
    args = [*overrides(llm, out, fx), "input.captions_per_image=5", "input.splits=[train,val,test]"]
    s = run_perturb(perturb_cfg(tmp_path, args))
    assert s["kept"] == s["rows"] == 17
    cfg = compose_cfg(
        [
            "+debug=fast", "data=trl_pairs", f"data.path={out}",
            "data.source.holdout={val: 1, test: 1, probe: 1}", "stage.run=[sft_c,cw_dpo]",
            "eval.caption_metrics=false", "eval.calibration=false", "eval.n_records=2",
            "eval.max_new_tokens=4", "callbacks.heldout.n_items=2",
        ],
        tmp_path / "train", tiny_cache_dir,
    )  # fmt: skip
    res = run_pipeline(cfg)
    assert res["stages"]["cw_dpo"]["steps"] == 2 and res["stages"]["sft_c"]["steps"] == 2
    assert res["stages"]["cw_dpo"]["negatives"]["sources"] == {"trl": 2 * 4}  # 2 steps x 4 pairs
    # the file reads back as written: the negatives are the model's, with kind and method kept
    from cwdpo.data.sources import PreferenceFileSource

    src = PreferenceFileSource(str(out), holdout={"val": 1, "test": 1, "probe": 1})
    recs = src.captions("train")
    written = {r["key"]: r for r in rows_of(out)}
    assert len(recs) == 14
    for rec in recs:
        row = written[rec.meta["key"]]
        assert rec.meta["rejected"] == row["rejected"] == default_answer(row["chosen"])
        assert rec.references == [row["chosen"]] and rec.meta["method"] == "llm"
        assert rec.meta["kind"] in PAPER_KINDS and rec.image_id == row["image_id"]


def test_the_readme_command_composes_and_validates(tmp_path):
    """The README's vLLM command: every value set, none left `???`, a server without a key."""
    import shlex

    from cwdpo.run.perturb_config import validate_perturb_config

    text = (REPO / "README.md").read_text()
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "cwdpo.perturb" in b]
    lines = [
        ln for b in blocks for ln in b.replace("\\\n", " ").splitlines() if "cwdpo.perturb" in ln
    ]
    assert len(lines) == 1
    words = shlex.split(lines[0].split(" #")[0])
    assert words[:3] == ["python", "-m", "cwdpo.perturb"]
    cfg = perturb_cfg(tmp_path, words[3:])
    validate_perturb_config(cfg)
    assert cfg.perturb.api_key_env is None and cfg.perturb.url == "http://localhost:8000/v1"
