"""CHAIR, AMBER and MMHal-Bench wired into `cwdpo.eval` and the in-training callback: live
generation on the tiny LLaVA and every tiny family, re-scoring saved predictions equals live
scoring, hand-written predictions score as counted by hand, checks (files, spaCy, the judge's
API key) before any model loads, and under DDP the answers, the scores and one judge request per
answer (rank 0 scores, the numbers are broadcast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cwdpo.run.checkpoint_eval import run_eval
from tests.bench_formats import (
    AMBER_DIS_ANSWERS,
    AMBER_GEN_ANSWERS,
    CHAIR_ANSWERS,
    MMHAL_ROWS,
    FakeRatingJudge,
    mmbench_answers,
    mmmu_answers,
    one_step_curve,
    pope_answers,
    run_benchmarks,
    write_amber,
    write_coco,
    write_mmbench,
    write_mmhal,
    write_mmmu,
    write_pope,
    write_predictions,
)
from tests.helpers import compose_cfg

REPO = Path(__file__).resolve().parent.parent
TASKS = ("chair", "amber", "mmhal")
KEY_ENV = "CWDPO_TEST_MMHAL_KEY"


@pytest.fixture()
def judge(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    srv = FakeRatingJudge()
    yield srv
    srv.close()


def judge_node(url: str, key_env: str | None = KEY_ENV) -> str:
    """`mmhal.judge=` as a Hydra override: the RatingJudge node the runner instantiates."""
    env = key_env if key_env else "null"
    return (
        "{_target_: cwdpo.metrics.benchmarks.mmhal.RatingJudge, "
        f"url: '{url}', model: judge-1, api_key_env: {env}, max_retries: 0}}"
    )


def hallucination_overrides(root: Path, url: str, limit: int | None = 1) -> list[str]:
    """CHAIR (explicit COCO files), AMBER (both tasks, exact matching) and MMHal-Bench (the
    release layout under `path`) on their fixtures, `limit` questions each (AMBER: per task)."""
    coco = write_coco(_mkdir(root / "coco"))
    amber = write_amber(_mkdir(root / "amber"))
    write_mmhal(_mkdir(root / "mmhal"))
    over = [*(f"chair.{k}={v}" for k, v in coco.items()), "chair.n_images=0"]
    over += [f"amber.{k}={v}" for k, v in amber.items() if k != "queries"]
    over += ["amber.queries=[" + ",".join(amber["queries"]) + "]", "amber.similarity=exact"]
    over += [f"mmhal.path={root / 'mmhal'}", f"mmhal.judge={judge_node(url)}"]
    if limit:
        over += [f"{t}.limit={limit}" for t in TASKS]
    return over + [f"{t}.max_new_tokens=4" for t in TASKS]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _eval(overrides, out, cache, ckpt=None):
    extra = [f"ckpt={ckpt}"] if ckpt else []
    return run_eval(compose_cfg([*overrides, *extra], out, cache, name="eval"))


def _mapping(out: Path, tasks) -> str:
    return "{" + ",".join(f"{t}:{out / f'{t}.predictions.jsonl'}" for t in tasks) + "}"


def _same(res: dict, again: dict, tasks) -> None:
    floats = {k: v for k, v in res.items() if k.split("/")[0] in tasks and isinstance(v, float)}
    assert floats, "no metrics to compare"
    for k, v in floats.items():
        assert again[k] == v, k


def test_eval_hallucination_tasks_end_to_end_and_rescoring(
    tmp_path, tiny_cache_dir, tiny_vlm_path, judge
):
    over = hallucination_overrides(tmp_path / "data", judge.url, limit=2)
    out = tmp_path / "out"
    res = _eval(["eval.tasks=[chair,amber,mmhal]", *over], out, tiny_cache_dir, tiny_vlm_path)
    for key in ("chair/chair_s", "chair/recall", "amber/generative/chair", "amber/amber_score"):
        assert 0.0 <= res[key] <= 100.0, key
    assert res["amber/discriminative/accuracy"] in (0.0, 50.0, 100.0)  # 2 questions
    assert 0.0 <= res["mmhal/score"] <= 6.0
    assert res["chair/protocol"] == "generate + parse (official rules)"
    assert "similarity=exact" in res["amber/protocol"] and "judge-1" in res["mmhal/protocol"]
    assert len(judge.requests) == 2  # one rating per MMHal answer
    assert judge.requests[0]["auth"] == "Bearer sk-test"
    md = (out / "eval.md").read_text()
    assert "| chair — generate + parse" in md and "| mmhal/score |" in md
    ids = {
        t: [json.loads(x)["id"] for x in (out / f"{t}.predictions.jsonl").read_text().splitlines()]
        for t in TASKS
    }
    assert ids == {"chair": ["1", "2"], "amber": ["1", "2", "1005", "1006"], "mmhal": ["0", "1"]}
    # the judge's replies next to the answers, for auditing a rating
    audit = [json.loads(x) for x in (out / "mmhal.judge.jsonl").read_text().splitlines()]
    assert [(r["id"], r["rating"]) for r in audit] == [("0", 5), ("1", 5)]  # the fake's default
    # re-score without a model (a bad model path proves none is loaded); the judge rates again
    again = _eval(
        ["eval.tasks=[chair,amber,mmhal]", f"eval.predictions={_mapping(out, TASKS)}", *over],
        tmp_path / "re",
        tiny_cache_dir,
        ckpt=str(tmp_path / "no_model_here"),
    )
    assert again["ckpt"] == "saved predictions" and len(judge.requests) == 4
    _same(res, again, TASKS)


def test_all_six_rescored_from_hand_written_predictions(tmp_path, tiny_cache_dir, judge):
    """Every benchmark's fixture answers (another toolkit's file) re-scored by `cwdpo.eval`
    without a model; CHAIR, AMBER and MMHal as counted by hand (tests/test_bench_*.py)."""
    data = tmp_path / "data"
    over = hallucination_overrides(data, judge.url, limit=None)
    pope, images = write_pope(_mkdir(data / "pope"))
    over += [f"pope.path={pope}", f"pope.image_root={images}"]
    over += [f"mmmu.path={write_mmmu(data / 'mmmu')}"]
    over += [f"mmbench.path={write_mmbench(data / 'mmbench')}"]
    answers = {
        "pope": pope_answers(),
        "chair": CHAIR_ANSWERS,
        "amber": {**AMBER_GEN_ANSWERS, **AMBER_DIS_ANSWERS},
        "mmhal": {str(i): answer for i, (_, answer, _, _) in enumerate(MMHAL_ROWS)},
        "mmmu": mmmu_answers(),
        "mmbench": mmbench_answers(),
    }
    preds = {t: write_predictions(tmp_path / f"{t}.jsonl", a) for t, a in answers.items()}
    mapping = "{" + ",".join(f"{t}:{p}" for t, p in preds.items()) + "}"
    res = _eval(
        ["eval.tasks=[pope,chair,amber,mmhal,mmmu,mmbench]", f"eval.predictions={mapping}", *over],
        tmp_path / "out",
        tiny_cache_dir,
        ckpt=str(tmp_path / "none"),
    )
    assert res["ckpt"] == "saved predictions"
    want = {
        # mentions 7, hallucinated 2 in 2 of 4 descriptions; GT 7, covered 5; 34 words
        "chair/chair_s": 50.0,
        "chair/chair_i": 100 * 2 / 7,
        "chair/recall": 100 * 5 / 7,
        "chair/length": 34 / 4,
        # nouns 8, hallucinated 3; cover 4 of 6; 2 of 3 with a hallucination; cog 2 of 5
        "amber/generative/chair": 37.5,
        "amber/generative/cover": 400 / 6,
        "amber/generative/hal": 200 / 3,
        "amber/generative/cog": 40.0,
        # right 5 of 8; predicted No 5, right 3 → P 60; true no 4 → R 75
        "amber/discriminative/accuracy": 62.5,
        "amber/discriminative/f1": 2 * 60 * 75 / 135,
        "amber/amber_score": (100 - 37.5 + 2 * 60 * 75 / 135) / 2,
        # ratings 6 4 1 0 0 3 (two replies unparsed → 0)
        "mmhal/score": 14 / 6,
        "mmhal/hallucination_rate": 50.0,
        "mmhal/unparsed": 2.0,
        "mmhal/counting/score": 0.5,
        "mmbench/overall": 40.0,
    }
    assert {k: res[k] for k in want} == pytest.approx(want)
    assert len(judge.requests) == len(MMHAL_ROWS)
    md = (tmp_path / "out" / "eval.md").read_text()
    for t in ("pope", "chair", "amber", "mmhal", "mmmu", "mmbench"):
        assert f"| {t} — generate + parse" in md, t


def test_checks_before_any_model_loads(tmp_path, tiny_cache_dir, judge, monkeypatch):
    """A bad model path would fail the load: each error below comes before it."""
    over = hallucination_overrides(tmp_path / "data", judge.url)
    none = str(tmp_path / "no_model_here")
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=f"environment variable {KEY_ENV} .api_key_env. is not"):
        _eval(["eval.tasks=[mmhal]", *over], tmp_path / "o1", tiny_cache_dir, none)
    with pytest.raises(ValueError, match=r"mmhal is scored by a judge and mmhal.judge is not"):
        _eval(["eval.tasks=[mmhal]", *over, "mmhal.judge=null"], tmp_path / "o2", tiny_cache_dir)
    with pytest.raises(ValueError, match=r"mmhal.judge.url is not set"):
        node = judge_node("x", None).replace("url: 'x'", "url: null")
        _eval(["eval.tasks=[mmhal]", *over, f"mmhal.judge={node}"], tmp_path / "o3", tiny_cache_dir)
    # AMBER's official generative scorer needs spaCy's vectors (not installed here)
    with pytest.raises(RuntimeError, match="pip install spacy"):
        _eval(
            ["eval.tasks=[amber]", *over, "amber.similarity=spacy"],
            tmp_path / "o4",
            tiny_cache_dir,
            none,
        )
    with pytest.raises(ValueError, match=r"set chair.path=.*\(or its files: chair.instances="):
        _eval(["eval.tasks=[chair]"], tmp_path / "o5", tiny_cache_dir, none)
    with pytest.raises(ValueError, match=r"chair: give captions= \(a file\) or path="):
        _eval(["eval.tasks=[chair]", "chair.instances=x.json"], tmp_path / "o6", tiny_cache_dir)
    with pytest.raises(ValueError, match=r"chair: instances not found: .*nope.json"):
        bad = [
            o if not o.startswith("chair.instances=") else "chair.instances=nope.json" for o in over
        ]
        _eval(["eval.tasks=[chair]", *bad], tmp_path / "o7", tiny_cache_dir, none)


def test_amber_discriminative_only_needs_no_word_vectors(tmp_path, tiny_cache_dir):
    """With only discriminative queries the default similarity=spacy is never used."""
    amber = write_amber(_mkdir(tmp_path / "d"))
    pred = write_predictions(tmp_path / "p.jsonl", AMBER_DIS_ANSWERS)
    over = [f"amber.{k}={v}" for k, v in amber.items() if k != "queries"]
    over += [f"amber.queries={amber['queries'][1]}", f"eval.predictions={pred}"]
    res = _eval(["eval.tasks=[amber]", *over], tmp_path / "out", tiny_cache_dir)
    assert res["amber/discriminative/accuracy"] == 62.5 and "amber/generative/chair" not in res
    assert res["amber/protocol"] == "generate + parse (official rules)"


def test_callback_config_errors_before_training(tmp_path, tiny_cache_dir):
    from cwdpo.run.config_schema import ConfigError, validate_config

    cfg = compose_cfg(["callbacks.benchmarks.tasks=[chair,mmhal]"], tmp_path, tiny_cache_dir)
    with pytest.raises(
        ConfigError, match=r"has chair: .*set chair.path=.*has mmhal: .*mmhal.path="
    ):
        validate_config(cfg, "train")


# ------------------------------------------------------------------------- in-training callback
def test_callback_logs_hallucination_curves(backbone, tmp_path, judge):
    """bench/chair, bench/amber, bench/mmhal at steps 0, 2, 3; the last row equals scoring the
    trained policy directly; the judge rates each MMHal answer once per evaluation."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from cwdpo.callbacks.benchmarks import BENCH_CSV, BenchmarkCurve
    from cwdpo.metrics.benchmarks.generate import generate_answers
    from cwdpo.metrics.benchmarks.mmhal import RatingJudge
    from cwdpo.metrics.benchmarks.registry import build_task, subset
    from cwdpo.utils.run_files import read_csv
    from tests.helpers import cpu_trainer, shapes_sft

    configs = callback_configs(tmp_path / "data", judge.url)
    curve = BenchmarkCurve(
        tasks=list(TASKS), configs=configs, every_n_steps=2, n_items=1, stages=["sft_c"]
    )
    L.seed_everything(0)
    module, dm = shapes_sft(backbone, {"train": 12, "val": 4, "test": 4, "probe": 4}, 3)
    logger = CSVLogger(str(tmp_path / "logs"), name="", version="")
    trainer = cpu_trainer(tmp_path / "run", 3, [curve], logger=logger, log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)

    rows = read_csv(tmp_path / "run" / BENCH_CSV)
    assert sorted({(r["task"], int(r["step"])) for r in rows}) == [
        (t, s) for t in sorted(TASKS) for s in (0, 2, 3)
    ]
    assert len(judge.requests) == 3  # 1 MMHal item × 3 evaluations
    last = {r["metric"]: float(r["value"]) for r in rows if r["step"] == "3"}
    for task, node in configs.items():
        if task == "mmhal":
            node = {**node, "judge": RatingJudge(judge.url, "judge-1", api_key_env=KEY_ENV)}
        bench = build_task(task, node)
        items = subset(bench.read(), 1)
        direct = bench.score(items, generate_answers(backbone, items, 16, 4))
        for k, v in direct.items():
            assert last[k] == pytest.approx(v), k
    logged = read_csv(tmp_path / "logs" / "metrics.csv")
    chair_s = [r["bench/chair/chair_s"] for r in logged if r.get("bench/chair/chair_s")]
    assert len(chair_s) == 3 and "bench/amber/discriminative/f1" in logged[0]


def test_pipeline_logs_chair_amber_mmhal_from_the_config(tmp_path, tiny_cache_dir, judge):
    """`cwdpo.train` with callbacks.benchmarks.tasks=[chair,amber,mmhal]: the nodes (MMHal's
    judge instantiated from its `_target_`) reach the callback; curves in results.json."""
    from cwdpo.callbacks.benchmarks import BENCH_CSV
    from cwdpo.run.pipeline import run_pipeline
    from cwdpo.utils.run_files import read_csv

    over = ["+debug=fast", "eval.meteor=false", "callbacks.benchmarks.tasks=[chair,amber,mmhal]"]
    over += ["callbacks.benchmarks.every_n_steps=2", "callbacks.benchmarks.n_items=1"]
    over += hallucination_overrides(tmp_path / "data", judge.url)
    res = run_pipeline(compose_cfg(over, tmp_path / "run", tiny_cache_dir))
    rows = read_csv(tmp_path / "run" / BENCH_CSV)
    assert sorted({r["task"] for r in rows}) == sorted(TASKS)
    last = {r["metric"]: float(r["value"]) for r in rows if r["step"] == "2"}
    stage = res["stages"]["cw_dpo"]
    for key in ("chair/chair_i", "amber/generative/cover", "mmhal/score"):
        assert stage[f"bench/{key}"] == last[key], key
    assert len(judge.requests) == 2  # cw_dpo: start + step 2, one MMHal question each


def callback_configs(root: Path, url: str, max_new_tokens: int = 4) -> dict[str, dict]:
    """The three tasks' nodes as plain dicts (the callback's `configs`)."""
    from cwdpo.metrics.benchmarks.mmhal import RatingJudge

    coco = write_coco(_mkdir(root / "coco"))
    amber = write_amber(_mkdir(root / "amber"))
    mmhal = write_mmhal(_mkdir(root / "mmhal"))
    judge = RatingJudge(url, "judge-1", api_key_env=KEY_ENV, max_retries=0)
    return {
        "chair": {**coco, "n_images": 0, "max_new_tokens": max_new_tokens},
        "amber": {**amber, "similarity": "exact", "max_new_tokens": max_new_tokens},
        "mmhal": {**mmhal, "judge": judge, "max_new_tokens": max_new_tokens},
    }


# ------------------------------------------------------------------------------ every tiny family
def _families():
    from cwdpo.model.families import FAMILIES

    return list(FAMILIES)


@pytest.mark.parametrize("name", _families())
def test_every_family_runs_the_hallucination_tasks(name, tmp_path, tiny_cache_dir, judge):
    """From `cwdpo.eval` (1 CHAIR image, 1 + 1 AMBER queries, 1 MMHal question; re-scoring the
    saved answers gives the same) and as the in-training callback (start + one SFT step)."""

    from cwdpo.model.backbone import VLMBackbone
    from cwdpo.model.families import ensure_family

    path = ensure_family(name, tiny_cache_dir)
    over = ["eval.tasks=[chair,amber,mmhal]", "eval.batch_size=2"]
    over += hallucination_overrides(tmp_path / "data", judge.url)
    res = _eval(over, tmp_path / "out", tiny_cache_dir, path)
    assert res["amber/discriminative/accuracy"] in (0.0, 100.0) and "chair/chair_s" in res
    again = _eval(
        [*over, f"eval.predictions={_mapping(tmp_path / 'out', TASKS)}"],
        tmp_path / "re",
        tiny_cache_dir,
    )
    _same(res, again, TASKS)

    configs = callback_configs(tmp_path / "cb", judge.url, max_new_tokens=3)
    bb = VLMBackbone.from_pretrained(path, max_length=384)
    assert one_step_curve(bb, list(TASKS), configs, tmp_path / "run") == [
        (t, s) for t in sorted(TASKS) for s in ("0", "1")
    ]


# --------------------------------------------------------------------------------------- DDP
@pytest.mark.dist
def test_two_gloo_processes_equal_one_and_the_judge_rates_each_answer_once(
    tmp_path, tiny_vlm_path, judge
):
    """Each rank generates its shard; gathered answers and scores equal one process's; rank 0
    alone scores, so the judge gets one request per MMHal answer, not one per rank."""
    coco = write_coco(_mkdir(tmp_path / "coco"))
    amber = write_amber(_mkdir(tmp_path / "amber"))
    judge_cfg = {"_target_": "cwdpo.metrics.benchmarks.mmhal.RatingJudge", "url": judge.url}
    judge_cfg |= {"model": "judge-1", "api_key_env": KEY_ENV}
    nodes = {
        "chair": {**coco, "n_images": 0},
        "amber": {**amber, "similarity": "exact"},
        "mmhal": {**write_mmhal(_mkdir(tmp_path / "mmhal")), "judge": judge_cfg},
    }
    (one,) = run_benchmarks(tmp_path, tiny_vlm_path, nodes, world=1)
    # one request per answer in each run (6 after one process, 6 more after two): a rank that
    # scored too would add 6
    assert len(judge.requests) == len(MMHAL_ROWS)
    assert run_benchmarks(tmp_path, tiny_vlm_path, nodes, world=2) == [one, one]
    assert len(judge.requests) == len(MMHAL_ROWS) * 2
    assert len(one["chair"]["answers"]) == 4 and len(one["amber"]["answers"]) == 11
    assert one["chair"]["scores"]["chair/length"] >= 0.0
