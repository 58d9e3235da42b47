"""CaptionMetrics against pycocoevalcap's own COCOEvalCap-style computation.

PTB tokenization starts a JVM (~1 s), so the PTB work is batched into a module-scoped fixture.
METEOR's JVM needs ~20 s (more on a busy machine) to load its paraphrase tables, so the METEOR check
is marked ``slow`` (run it with ``pytest -m slow``); the fast tests run with ``meteor=False``.
"""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from cwdpo.metrics import CaptionMetrics
from cwdpo.metrics import captioning as cap
from tests.gloo import free_port

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="java not installed")

PREDS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs play with a frisbee in the park",
    "A plate of food with broccoli, rice and meat.",
    "A red double-decker bus driving down the street",
    "Une femme tient un parapluie rose sous la pluie ☂ — naïve café",
    "a cat sitting on a laptop keyboard",
]
REFS = [
    ["A surfer rides a large wave.", "A man on a surfboard riding a wave.", "Surfer in the ocean."],
    ["Two dogs playing frisbee on the grass.", "A pair of dogs chase a frisbee in a park."],
    ["A plate with broccoli, rice, and some meat.", "Food on a white plate.", "A healthy meal."],
    ["A red bus on a city street.", "A double decker bus drives down the road."],
    ["Une femme avec un parapluie rose.", "A woman holding a pink umbrella in the rain."],
    ["A cat lying on a laptop.", "A kitten sits on the keyboard of a computer.", "cat on laptop"],
]
GROUPS = ["in-domain", "near-domain", "in-domain", "out-domain", "near-domain", "in-domain"]
KEYS = ["cider", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l"]


def coco_eval_reference(preds, refs, meteor=None):
    """pycocoevalcap's COCOEvalCap.evaluate, minus SPICE: PTB-tokenize gts/res, run each scorer."""
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
    res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})

    def run(ids):
        g, r = {i: gts[i] for i in ids}, {i: res[i] for i in ids}
        bleu, _ = Bleu(4).compute_score(g, r)
        return {
            "cider": Cider().compute_score(g, r)[0] * 100,
            **{f"bleu_{k + 1}": bleu[k] * 100 for k in range(4)},
            "meteor": meteor.compute_score(g, r)[0] * 100 if meteor else math.nan,
            "rouge_l": Rouge().compute_score(g, r)[0] * 100,
        }

    out = run(list(range(len(preds))))
    for grp in sorted(set(GROUPS)):
        out.update(
            {f"{k}/{grp}": v for k, v in run([i for i, g in enumerate(GROUPS) if g == grp]).items()}
        )
    return out


@pytest.fixture(scope="module")
def full_metric():
    metric = CaptionMetrics(meteor=False)
    metric.update(PREDS[:4], REFS[:4], GROUPS[:4])
    metric.update(PREDS[4:], REFS[4:], GROUPS[4:])
    return metric, metric.compute()


# ---------------------------------------------------------------------------------- no Java
def test_string_encoding_round_trips_unicode():
    strings = [
        "",
        "plain",
        "naïve café",
        "日本語のキャプション",
        "emoji 🙂🐈‍⬛",
        "a\nb\tc",
        "x" * 300,
    ]
    enc = cap.encode_strings(strings)
    assert enc.dtype == torch.uint8 and enc.ndim == 1
    assert cap.decode_strings(enc) == strings
    nested = [["one"], [], ["ü", "🙂", ""], strings]
    assert cap.decode_nested(cap.encode_nested(nested)) == nested
    # closed under concatenation: this is what makes dist_reduce_fx="cat" correct
    both = torch.cat([cap.encode_strings(strings[:3]), cap.encode_strings(strings[3:])])
    assert cap.decode_strings(both) == strings
    assert cap.decode_strings(cap.encode_strings([])) == []


def test_states_hold_strings_through_update():
    metric = CaptionMetrics(tokenizer="python", meteor=False)
    metric.update(PREDS[:2], REFS[:2])
    metric.update(PREDS[2:], REFS[2:], GROUPS[2:])
    preds, refs, groups = metric._decoded()
    assert preds == PREDS and refs == REFS
    assert groups == ["", ""] + GROUPS[2:]


def test_errors_and_empty_updates():
    metric = CaptionMetrics(tokenizer="python", meteor=False)
    with pytest.raises(ValueError, match="no data"):
        metric.compute()
    metric.update([], [])  # empty batch is a no-op
    with pytest.raises(ValueError, match="no data"):
        metric.compute()
    with pytest.raises(ValueError, match="predictions"):
        metric.update(["a"], [["b"], ["c"]])
    with pytest.raises(ValueError, match="non-empty"):
        metric.update(["a"], [[]])
    with pytest.raises(ValueError, match="groups"):
        metric.update(["a"], [["b"]], groups=["x", "y"])
    with pytest.raises(ValueError, match="tokenizer"):
        CaptionMetrics(tokenizer="spacy")
    assert metric(["a dog"], [["a dog"]]) is None  # forward only accumulates
    assert metric._decoded()[0] == ["a dog"]


def test_fallback_without_java(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    assert cap.resolve_tokenizer("auto") == "python"
    with pytest.raises(RuntimeError, match="Java"):
        cap.resolve_tokenizer("ptb")
    metric = CaptionMetrics()
    metric.update(PREDS, REFS, GROUPS)
    out = metric.compute()
    assert metric.last_info["tokenizer"] == "python"
    assert "java" in metric.last_info["meteor"].lower()
    assert math.isnan(out["meteor"]) and math.isnan(out["meteor/in-domain"])
    for k in KEYS:
        if k != "meteor":
            assert math.isfinite(out[k]) and math.isfinite(out[f"{k}/out-domain"])
    assert out["cider"] > 0


def _ddp_worker(rank, world, port, path):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    metric = CaptionMetrics(tokenizer="python", meteor=False)
    if rank == 0:  # uneven split; rank 2 gets nothing (its empty state must still gather)
        metric.update(PREDS[:1], REFS[:1], GROUPS[:1])
    elif rank == 1:
        metric.update(PREDS[1:], REFS[1:], GROUPS[1:])
    out = metric.compute()
    torch.save(out, f"{path}.{rank}")
    dist.destroy_process_group()


@pytest.mark.dist
def test_real_ddp_gather_matches_single_process(tmp_path):
    port = free_port()
    path = str(tmp_path / "out")
    mp.start_processes(_ddp_worker, args=(3, port, path), nprocs=3, start_method="fork")
    single = CaptionMetrics(tokenizer="python", meteor=False)
    single.update(PREDS, REFS, GROUPS)
    expected = single.compute()
    for rank in range(3):
        got = torch.load(f"{path}.{rank}")
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-12, nan_ok=True), k
    assert not os.path.exists(f"{path}.3")


# ---------------------------------------------------------------------------------- Java
@needs_java
def test_python_tokenizer_matches_ptb_on_typical_captions():
    caps = (
        [p for p in PREDS if p.isascii()]
        + [r for rs in REFS for r in rs]
        + [
            "Don't stop -- it's 3.5 km/h at 1,000 ft; e.g. U.S. \"quoted\" 'single' (x) [y] {z}",
            "Mr. Smith's cats' toys... end.  He said: hello?! yes",
            "i'm we're they've you'll she'd can't won't gonna",
            "black-and-white photo of a cat & dog #1 50% $5 a*b",
        ]
    )
    assert [cap.python_ptb_tokenize(c) for c in caps] == cap.ptb_tokenize(caps)


@needs_java
def test_fallback_close_to_ptb_on_simple_text(monkeypatch):
    preds = ["a man riding a wave on a surfboard", "two dogs play in the park", "a cat on a laptop"]
    refs = [
        ["a surfer rides a big wave", "a man on a surfboard riding a wave"],
        ["two dogs playing on the grass", "dogs play in a park"],
        ["a cat lying on a laptop", "a kitten sits on a computer"],
    ]
    ptb = CaptionMetrics(tokenizer="ptb", meteor=False)
    ptb.update(preds, refs)
    ptb_out = ptb.compute()
    assert ptb.last_info["meteor"].startswith("disabled")
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    py = CaptionMetrics()
    py.update(preds, refs)
    py_out = py.compute()
    assert py.last_info["tokenizer"] == "python"
    for k in ["cider", "bleu_1", "bleu_4", "rouge_l"]:
        assert math.isfinite(py_out[k])
        assert py_out[k] == pytest.approx(ptb_out[k], rel=1e-9)
    assert math.isnan(py_out["meteor"]) and "java" in py.last_info["meteor"].lower()


def _assert_same(got, expected):
    assert set(got) == set(expected)
    for k, v in expected.items():  # overall and per group (each scored on its own subset)
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-9, nan_ok=True), k


@needs_java
def test_matches_pycocoevalcap(full_metric):
    metric, out = full_metric
    assert metric.last_info["tokenizer"] == "ptb"
    assert metric.last_info["meteor"].startswith("disabled") and math.isnan(out["meteor"])
    assert metric.last_info["groups"] == {"in-domain": 3, "near-domain": 2, "out-domain": 1}
    _assert_same(out, coco_eval_reference(PREDS, REFS))
    assert 0 < out["cider"] < 1000 and 0 < out["bleu_1"] <= 100  # ×100 scale


@needs_java
@pytest.mark.slow
def test_matches_pycocoevalcap_with_meteor():
    metric = CaptionMetrics()  # spawns the shared METEOR JVM, which warms up meanwhile
    metric.update(PREDS, REFS, GROUPS)
    expected = coco_eval_reference(PREDS, REFS, cap.shared_meteor())
    out = metric.compute()
    assert metric.last_info["meteor"] == "ok"
    _assert_same(out, expected)
    assert 0 < out["meteor"] <= 100 and 0 < out["meteor/out-domain"] <= 100


@needs_java
def test_two_ranks_merged_equal_one_instance(full_metric):
    _, expected = full_metric
    rank0, rank1 = CaptionMetrics(meteor=False), CaptionMetrics(meteor=False)
    rank0.update(PREDS[:2], REFS[:2], GROUPS[:2])
    rank1.update(PREDS[2:], REFS[2:], GROUPS[2:])
    rank0.merge_state(rank1)  # what torchmetrics' "cat" sync does with the gathered states
    _assert_same(rank0.compute(), expected)
