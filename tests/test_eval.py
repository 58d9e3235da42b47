"""`python -m cwdpo.eval` end to end, and multiple-choice scoring against a direct recomputation."""

from __future__ import annotations

import json

import pytest
import torch

from cwdpo.data.multiple_choice import read_mmbench, read_mmmu
from cwdpo.run.checkpoint_eval import run_eval
from cwdpo.run.evaluation import mc_prompt, predict_multiple_choice
from tests.formats import write_mmbench_tsv, write_mmmu_parquet
from tests.helpers import compose_cfg

SMALL = [
    "eval.n_records=6",
    "eval.max_new_tokens=6",
    "data.source.sizes={train:8,val:4,test:6,probe:4}",
]


def _brute_force_letters(backbone, questions, scoring):
    """One forward per option, no batching: the option with the highest log-likelihood."""
    preds = []
    for q in questions:
        best, best_letter = -float("inf"), None
        for letter, text in sorted(q.options.items()):
            enc = backbone.collate(
                [q.image.load()], [mc_prompt(q)], [letter if scoring == "letter" else text]
            )
            with torch.no_grad():
                lp = backbone.logps(enc)
            score = (
                lp.token[0, : int(lp.count[0]) - 1].sum().item()
                if scoring == "letter"
                else lp.mean[0].item()
            )
            if score > best:
                best, best_letter = score, letter
        preds.append(best_letter)
    return preds


@pytest.mark.parametrize("scoring", ["letter", "text"])
def test_multiple_choice_prediction_equals_brute_force(backbone, perturb, tmp_path, scoring):
    perturb(backbone.model, 0.3, 1)
    backbone.max_length = 256  # MMBench prompts (hint + options) exceed the fixture's 128
    qs = read_mmbench(write_mmbench_tsv(tmp_path).path)
    assert predict_multiple_choice(backbone, qs, scoring, batch_size=3) == _brute_force_letters(
        backbone, qs, scoring
    )


def test_eval_entry_point_captioning_calibration_winrate(tmp_path, tiny_cache_dir, tiny_vlm_path):
    cfg = compose_cfg(
        [
            *SMALL,
            "eval.tasks=[captioning,calibration,winrate]",
            f"compare={tiny_vlm_path}",
            f"ckpt={tiny_vlm_path}",
        ],
        tmp_path,
        tiny_cache_dir,
        name="eval",
    )
    res = run_eval(cfg)
    on_disk = json.loads((tmp_path / "eval.json").read_text())
    for key in ("cider", "bleu_4", "rouge_l", "fact_accuracy", "calib/ece", "winrate/win_rate"):
        assert key in on_disk, key
    # the same model against itself: every item is a tie
    assert res["winrate/win_rate"] == pytest.approx(0.5)
    assert "| " in (tmp_path / "eval.md").read_text()


@pytest.mark.parametrize("fmt", ["mmbench", "mmmu"])
def test_eval_entry_point_multiple_choice(fmt, tmp_path, tiny_cache_dir, tiny_vlm_path):
    if fmt == "mmbench":
        path, qs = write_mmbench_tsv(tmp_path / "mc").path, None
        qs = read_mmbench(path)
        extra = ["mc.circular=true"]
    else:
        fx = write_mmmu_parquet(tmp_path / "mc")
        path, qs = fx.path, read_mmmu(fx.path)
        extra = []
    cfg = compose_cfg(
        [
            "eval.tasks=[multiple_choice]",
            f"mc.format={fmt}",
            f"mc.path={path}",
            f"ckpt={tiny_vlm_path}",
            *extra,
        ],
        tmp_path / "out",
        tiny_cache_dir,
        name="eval",
    )
    res = run_eval(cfg)
    assert 0.0 <= res["mc/accuracy"] <= 100.0
    cats = {q.category for q in qs if q.category}
    assert {f"mc/accuracy/{c}" for c in cats} <= set(res)
    written = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert written["mc/accuracy"] == res["mc/accuracy"]


def test_multiple_choice_accuracy_metric_circular_and_categories():
    from cwdpo.metrics.multiple_choice import MultipleChoiceAccuracy

    m = MultipleChoiceAccuracy()
    # group g1: 2 rotations, one wrong -> wrong under circular eval; g2 right; g3 right
    m.update(
        ["A", "B", "C", "D"], ["A", "C", "C", "D"], ["x", "x", "y", "y"], ["g1", "g1", "g2", "g3"]
    )
    out = m.compute()
    assert out["accuracy"] == pytest.approx(100 * 2 / 3)
    assert out["accuracy/x"] == 0.0 and out["accuracy/y"] == 100.0


def test_unknown_eval_task_is_rejected(tmp_path, tiny_cache_dir):
    cfg = compose_cfg(
        ["eval.tasks=[captioning,bleurt]", "ckpt=x"], tmp_path, tiny_cache_dir, name="eval"
    )
    with pytest.raises(ValueError, match="bleurt"):
        run_eval(cfg)


def test_eval_winrate_with_a_configured_http_judge(
    tmp_path, tiny_cache_dir, tiny_vlm_path, backbone, perturb, monkeypatch
):
    """`judge=http` replaces the facts judge: every pair goes to the (fake) endpoint, with
    ckpt's caption as A unless the judge's seeded order swap put it second."""
    import random

    import hydra.utils

    from cwdpo.run.evaluation import generate_captions
    from tests.test_metrics_winrate import SECRET, FakeJudgeServer

    perturb(backbone.model, 0.3, 7)  # a second, different policy to compare with
    other = tmp_path / "other"
    backbone.save_pretrained(other)
    args = [
        *SMALL,
        "eval.tasks=[winrate]",
        f"compare={other}",
        f"ckpt={tiny_vlm_path}",
        "judge=http",
        "judge.api_key_env=JUDGE_KEY",
        "seed=5",
    ]
    server = FakeJudgeServer()
    try:
        cfg = compose_cfg(
            [*args, f"judge.url={server.url}"], tmp_path / "out", tiny_cache_dir, name="eval"
        )
        with pytest.raises(ValueError, match="JUDGE_KEY"):  # no key: refused before any model runs
            run_eval(cfg)
        assert not server.requests
        monkeypatch.setenv("JUDGE_KEY", SECRET)
        res = run_eval(cfg)
    finally:
        server.close()
    source = hydra.utils.instantiate(cfg.data.source)
    records = source.captions("test")[:6]
    mine = generate_captions(
        type(backbone).from_pretrained(tiny_vlm_path), records, source.prompt, 6, 6
    )
    theirs = generate_captions(type(backbone).from_pretrained(other), records, source.prompt, 6, 6)
    assert mine != theirs and len(server.requests) == 6
    assert server.requests[0]["body"]["model"] == "gpt-4o"
    rng = random.Random(5)
    swaps = [rng.random() < 0.5 for _ in range(6)]
    for req, m, t, swap in zip(server.requests, mine, theirs, swaps):
        prompt = req["body"]["messages"][-1]["content"]
        assert (
            f"Caption A: {t if swap else m}\n" in prompt
            and f"Caption B: {m if swap else t}\n" in prompt
        )
    # no caption has GOOD in it, so the fake answers "B" every time: A wins exactly when swapped
    assert res["winrate/win_rate"] == pytest.approx(sum(swaps) / 6)
    assert "HttpJudge" in res["winrate/judge"] and SECRET not in json.dumps(res)


def test_eval_mode_restores_the_previous_mode_also_on_error():
    from cwdpo.utils.modes import eval_mode

    m = torch.nn.Sequential(torch.nn.Dropout(0.5))
    for was in (True, False):
        m.train(was)
        with eval_mode(m) as inner:
            assert inner is m and not m.training and not m[0].training
        assert m.training is was and m[0].training is was
        with pytest.raises(RuntimeError), eval_mode(m):
            raise RuntimeError("boom")
        assert m.training is was
