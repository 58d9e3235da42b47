"""WinRate (bootstrap CI) and the judges, incl. HttpJudge against a local fake OpenAI-style server."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from cwdpo.metrics import FactsJudge, HttpJudge, ReferenceJudge, ScoreJudge, WinRate
from cwdpo.metrics.winrate import HttpJudgeError, bootstrap_win_rate_ci, parse_verdict
from tests.fake_openai import FakeChatServer, chat_reply

HAS_JAVA = shutil.which("java") is not None
SECRET = "sk-test-SECRET-0123456789"


# ---------------------------------------------------------------------------------- WinRate
def test_counts_and_ties_count_half():
    outcomes = torch.tensor([1.0, 1.0, 0.5, 0.0, 0.5, 1.0, 0.0])
    metric = WinRate()
    metric.update(outcomes[:3])
    metric.update(outcomes[3:].tolist())
    out = metric.compute()
    assert (out["n"], out["wins"], out["ties"], out["losses"]) == (7, 3, 2, 2)
    assert out["win_rate"] == pytest.approx(outcomes.numpy().mean())
    assert out["win_rate"] == pytest.approx((3 + 0.5 * 2) / 7)
    assert out["ci_low"] <= out["win_rate"] <= out["ci_high"]


def test_bootstrap_matches_numpy_and_brute_force():
    rng = np.random.default_rng(123)
    outcomes = rng.choice([0.0, 0.5, 1.0], size=300, p=[0.3, 0.2, 0.5])
    metric = WinRate(n_boot=2000, seed=7)
    metric.update(torch.from_numpy(outcomes))
    out = metric.compute()
    w, t, l_ = (int((outcomes == v).sum()) for v in (1.0, 0.5, 0.0))
    # 1) exact recomputation of the documented procedure with the same seed
    counts = np.random.default_rng(7).multinomial(300, np.array([w, t, l_]) / 300, size=2000)
    rates = (counts[:, 0] + 0.5 * counts[:, 1]) / 300
    assert (out["ci_low"], out["ci_high"]) == tuple(np.quantile(rates, [0.025, 0.975]))
    # 2) brute-force index resampling (different random draws, same distribution)
    idx = np.random.default_rng(99).integers(0, 300, size=(4000, 300))
    brute = np.quantile(outcomes[idx].mean(axis=1), [0.025, 0.975])
    assert out["ci_low"] == pytest.approx(brute[0], abs=0.015)
    assert out["ci_high"] == pytest.approx(brute[1], abs=0.015)
    # 3) deterministic, and the seed matters
    again = WinRate(n_boot=2000, seed=7)
    again.update(torch.from_numpy(outcomes))
    assert again.compute() == out
    assert bootstrap_win_rate_ci(w, t, l_, 2000, seed=8) != (out["ci_low"], out["ci_high"])


def test_ci_narrows_with_n_and_degenerate_cases():
    def width(n):
        metric = WinRate(seed=0)
        metric.update(torch.tensor([1.0, 0.5, 0.0, 1.0] * n))
        out = metric.compute()
        assert out["ci_low"] <= out["win_rate"] <= out["ci_high"]
        return out["ci_high"] - out["ci_low"]

    assert width(10) > width(100) > width(1000) > 0
    metric = WinRate()
    metric.update(torch.ones(5))
    out = metric.compute()
    assert out["win_rate"] == out["ci_low"] == out["ci_high"] == 1.0


def test_errors_and_merge():
    metric = WinRate()
    with pytest.raises(ValueError, match="no data"):
        metric.compute()
    with pytest.raises(ValueError, match="outcomes"):
        metric.update(torch.tensor([1.0, 0.7]))
    a, b, full = WinRate(), WinRate(), WinRate()
    a.update(torch.tensor([1.0, 0.0]))
    b.update(torch.tensor([0.5, 1.0, 1.0]))
    full.update(torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0]))
    a.merge_state(b)  # the sum reduction DDP uses
    assert a.compute() == full.compute()


# ---------------------------------------------------------------------------------- judges
def test_score_and_facts_judges():
    items = [{"facts": 3}, {"facts": 1}, {"facts": 2}]

    def count_words(caption, item):
        return len(caption.split()) / item["facts"]

    judge = ScoreJudge(count_words)
    assert judge(["a b c", "a", "a b"], ["a", "a b", "a c"], items) == [1.0, 0.0, 0.5]
    assert ScoreJudge(count_words, tol=1.0)(["a b c d"], ["a"], items[:1]) == [0.5]
    facts = FactsJudge(count_words)
    assert facts.name == "facts" and isinstance(facts, ScoreJudge)
    assert facts(["a b"], ["a"], items[:1]) == [1.0]
    with pytest.raises(ValueError, match="same length"):
        judge(["a"], [], [])


ITEMS = [
    {"references": ["A man riding a wave on a surfboard.", "A surfer rides a big wave."]},
    {"references": ["Two dogs play with a frisbee.", "Dogs chasing a frisbee in the park."]},
    {"references": ["A plate of food with broccoli.", "Broccoli and rice on a plate."]},
]
OUT_A = ["A man riding a wave on a surfboard", "a cat on a sofa", "A plate of food."]
OUT_B = ["a dog in a car", "Two dogs play with a frisbee in the park.", "A plate of food."]


@pytest.mark.skipif(not HAS_JAVA, reason="java not installed")
def test_reference_judge_matches_pycocoevalcap_cider():
    judge = ReferenceJudge()
    sa, sb = judge.scores(OUT_A, OUT_B, ITEMS)
    assert judge.last_tokenizer == "ptb"
    tok = PTBTokenizer()
    gts = tok.tokenize(
        {i: [{"caption": r} for r in it["references"]] for i, it in enumerate(ITEMS)}
    )
    res = tok.tokenize(
        {i: [{"caption": c}] for i, c in enumerate(OUT_A)}
        | {len(ITEMS) + i: [{"caption": c}] for i, c in enumerate(OUT_B)}
    )
    _, ea = Cider().compute_score(gts, {i: res[i] for i in range(3)})
    _, eb = Cider().compute_score(gts, {i: res[3 + i] for i in range(3)})
    np.testing.assert_allclose(sa, ea, rtol=1e-12)
    np.testing.assert_allclose(sb, eb, rtol=1e-12)
    assert judge(OUT_A, OUT_B, ITEMS) == [1.0, 0.0, 0.5]  # last pair identical -> tie


def test_reference_judge_without_java(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    judge = ReferenceJudge()
    assert judge(OUT_A, OUT_B, ITEMS) == [1.0, 0.0, 0.5]
    assert judge.last_tokenizer == "python"
    with pytest.raises(ValueError, match="references"):
        judge(["a"], ["b"], [{}])


def test_parse_verdict():
    for text, want in [
        ("A", "A"), (" b\n", "B"), ("**A**", "A"), ("Tie.", "tie"), ("(B)", "B"), ('"tie"', "tie"),
        ("Answer: B", "B"), ("The better caption is A.", "A"), ("Caption B is better.", "B"),
        ("Verdict: tie", "tie"), ("equal", "tie"),
        ("I think this is a hard one", None), ("A or B, I cannot say", None), ("", None),
        ("Answer: A. Caption B is better", None),
    ]:  # fmt: skip
        assert parse_verdict(text) == want, text


# ---------------------------------------------------------------------------------- HttpJudge
class FakeJudgeServer(FakeChatServer):
    """OpenAI-style /chat/completions: prefers the caption containing GOOD; checks the API key."""

    def __init__(self):
        self.requests: list[dict] = []
        self.fail_with: int | None = None
        super().__init__()

    def reply(self, body, headers, path):
        self.requests.append({"path": path, "auth": headers.get("Authorization"), "body": body})
        if headers.get("Authorization") != f"Bearer {SECRET}":
            return 401, {"error": "bad key"}
        if self.fail_with:
            return self.fail_with, {"error": "boom"}
        prompt = body["messages"][-1]["content"]
        first = re.search(r"^Caption A: (.*)$", prompt, re.M).group(1)
        second = re.search(r"^Caption B: (.*)$", prompt, re.M).group(1)
        if "GARBAGE" in first + second:
            return chat_reply("Hmm, hard to say.")
        if "GOOD" in first and "GOOD" in second:
            return chat_reply("tie")
        return chat_reply("**A**" if "GOOD" in first else "Answer: B")


@pytest.fixture()
def server():
    srv = FakeJudgeServer()
    yield srv
    srv.close()


def test_http_judge_maps_answers_back(server, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", SECRET)
    judge = HttpJudge(server.url, "judge-model", api_key_env="JUDGE_KEY", seed=3)
    n = 12
    # i % 3 == 0: both GOOD (tie); 1: only A GOOD (A wins); 2: only B GOOD (B wins)
    out_a = [f"caption {i} GOOD" if i % 3 in (0, 1) else f"caption {i}" for i in range(n)]
    out_b = [f"other {i} GOOD" if i % 3 in (0, 2) else f"other {i}" for i in range(n)]
    out_a[5], out_b[5] = "GARBAGE", "GARBAGE too"
    items = [{"references": [f"ref {i}", "another ref"], "prompt": "Describe."} for i in range(n)]
    got = judge(out_a, out_b, items)
    want = [0.5 if i == 5 else {0: 0.5, 1: 1.0, 2: 0.0}[i % 3] for i in range(n)]
    assert got == want
    assert judge.n_unparsed == 1
    assert len(server.requests) == n
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == f"Bearer {SECRET}"
    assert req["body"]["model"] == "judge-model"
    prompt = req["body"]["messages"][-1]["content"]
    assert "ref 0" in prompt and "another ref" in prompt and '"A", "B" or "tie"' in prompt
    # both presentation orders occurred (position bias cancels), reproducibly for a seed
    firsts = [
        re.search(r"^Caption A: (.*)$", r["body"]["messages"][-1]["content"], re.M).group(1)
        for r in server.requests
    ]
    swapped = [f != a for f, a in zip(firsts, out_a)]
    assert 0 < sum(swapped) < n
    again = HttpJudge(server.url, "judge-model", api_key_env="JUDGE_KEY", seed=3)
    assert again(out_a, out_b, items) == got
    firsts2 = [
        re.search(r"^Caption A: (.*)$", r["body"]["messages"][-1]["content"], re.M).group(1)
        for r in server.requests[n:]
    ]
    assert firsts2 == firsts


def test_http_judge_never_exposes_key(server, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", SECRET)
    judge = HttpJudge(server.url, "judge-model", api_key_env="JUDGE_KEY", backoff=0.0)
    for text in (repr(judge), str(judge), str(vars(judge)), repr(vars(judge))):
        assert SECRET not in text
    assert "JUDGE_KEY" in repr(judge)
    # server error: retried, then a clear error naming URL and status, without the key
    server.fail_with = 503
    with pytest.raises(HttpJudgeError) as info:
        judge(["a"], ["b"], [{"references": ["r"]}])
    msg = str(info.value)
    assert f"{server.url}/chat/completions" in msg and "503" in msg and "3 attempt" in msg
    assert SECRET not in msg and SECRET not in repr(info.value)
    assert len(server.requests) == 3  # 1 + max_retries
    # wrong key: 401 is not retried; the (wrong) key is not echoed either
    server.fail_with = None
    monkeypatch.setenv("JUDGE_KEY", "sk-wrong-KEY-987")
    with pytest.raises(HttpJudgeError, match="401") as info:
        judge(["a"], ["b"], [{"references": ["r"]}])
    assert "sk-wrong-KEY-987" not in str(info.value) and len(server.requests) == 4
    # no key in the environment: no Authorization header at all
    monkeypatch.delenv("JUDGE_KEY")
    with pytest.raises(HttpJudgeError, match="401"):
        judge(["a"], ["b"], [{"references": ["r"]}])
    assert server.requests[-1]["auth"] is None


def test_http_judge_connection_error_names_url():
    judge = HttpJudge("http://127.0.0.1:9/v1", "m", max_retries=0, timeout=2)
    with pytest.raises(HttpJudgeError, match=re.escape("http://127.0.0.1:9/v1/chat/completions")):
        judge(["a"], ["b"], [{"references": ["r"]}])


def test_win_rate_judge_sees_the_prompt_generation_used():
    """A record with its own prompt (preference data) is generated with it, and the judge is
    shown that same prompt, not the source's default."""
    from types import SimpleNamespace

    from PIL import Image

    from cwdpo.data.records import CaptionRecord, ImageRef
    from cwdpo.run.evaluation import generate_captions, win_rate

    recs = [
        CaptionRecord(
            f"im{i}",
            ImageRef(factory=lambda: Image.new("RGB", (4, 4))),
            ["a red circle"],
            meta={"prompt": f"own prompt {i}"} if i else {},
        )
        for i in range(2)
    ]
    source = SimpleNamespace(prompt="source prompt", score=lambda text, record: None)
    generated: list[str] = []

    def generate(images, prompts, max_new_tokens):
        generated.extend(prompts)
        return ["a red circle"] * len(prompts)

    outputs = generate_captions(SimpleNamespace(generate=generate), recs, source.prompt)
    seen: list[str] = []

    def judge(a, b, items):
        seen.extend(item["prompt"] for item in items)
        return [1.0] * len(a)

    win_rate(source, recs, outputs, outputs, judge=judge)
    assert generated == ["source prompt", "own prompt 1"]
    assert seen == generated
