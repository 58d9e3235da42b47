"""The benchmarks end to end: `cwdpo.eval eval.tasks=[pope,mmmu,mmbench]` on the tiny LLaVA
(generation, saved predictions, eval.json / eval.md), re-scoring a saved predictions file
without a model equals the live scores, the option log-likelihood protocol labelled, 2 gloo
processes give the one-process answers, and the in-training callback logs its curves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cwdpo.run.checkpoint_eval import run_eval
from tests.bench_formats import (
    mmbench_answers,
    one_step_curve,
    run_benchmarks,
    write_mmbench,
    write_mmmu,
    write_pope,
    write_predictions,
)
from tests.fake_openai import FakeChatServer, chat_reply
from tests.gloo import free_port
from tests.helpers import compose_cfg

REPO = Path(__file__).resolve().parent.parent
TASKS = ("pope", "mmmu", "mmbench")


def bench_overrides(root: Path, limit: int = 1) -> list[str]:
    """The three benchmarks on their fixtures, `limit` questions each (POPE: per split)."""
    pope, images = write_pope(root / "pope")
    return [
        f"pope.path={pope}",
        f"pope.image_root={images}",
        f"mmmu.path={write_mmmu(root / 'mmmu')}",
        f"mmbench.path={write_mmbench(root / 'mmbench')}",
        *(f"{t}.limit={limit}" for t in TASKS),
        *(f"{t}.max_new_tokens=4" for t in TASKS),
    ]


def _eval(overrides, out, cache, ckpt=None):
    extra = [f"ckpt={ckpt}"] if ckpt else []
    return run_eval(compose_cfg([*overrides, *extra], out, cache, name="eval"))


def test_eval_benchmarks_end_to_end_and_rescoring(tmp_path, tiny_cache_dir, tiny_vlm_path):
    over = bench_overrides(tmp_path / "data", limit=2)
    out = tmp_path / "out"
    res = _eval(["eval.tasks=[pope,mmmu,mmbench]", *over], out, tiny_cache_dir, tiny_vlm_path)
    for key in ("pope/all/f1", "pope/random/accuracy", "mmmu/accuracy", "mmbench/overall"):
        assert 0.0 <= res[key] <= 100.0, key
    assert res["mmbench/n_questions"] == 2.0 and res["pope/random/n"] == 2.0
    assert res["mmmu/protocol"].startswith("generate")
    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk["mmbench/overall"] == res["mmbench/overall"]
    md = (out / "eval.md").read_text()
    assert "| pope — generate + parse" in md and "| mmbench/overall |" in md
    preds = {t: out / f"{t}.predictions.jsonl" for t in TASKS}
    rows = [json.loads(x) for x in preds["pope"].read_text().splitlines()]
    assert len(rows) == 6 and set(rows[0]) == {"id", "answer"}  # 2 questions × 3 splits
    # questions 0 (4 rotations) and 1 (2 rotations)
    assert len(preds["mmbench"].read_text().splitlines()) == 6 == res["mmbench/n_rows"]
    # re-score the saved files without a model (a bad model path proves none is loaded)
    mapping = "{" + ",".join(f"{t}:{p}" for t, p in preds.items()) + "}"
    again = _eval(
        ["eval.tasks=[pope,mmmu,mmbench]", f"eval.predictions={mapping}", *over],
        tmp_path / "re",
        tiny_cache_dir,
        ckpt=str(tmp_path / "no_model_here"),
    )
    for k, v in res.items():
        if k.split("/")[0] in TASKS and isinstance(v, float):
            assert again[k] == v, k


def test_rescoring_a_hand_written_predictions_file(tmp_path, tiny_cache_dir):
    """Another toolkit's answers (here: the fixture's) score as hand-counted, without a model."""
    path = write_mmbench(tmp_path / "d")
    pred = write_predictions(tmp_path / "p.jsonl", mmbench_answers())
    res = _eval(
        ["eval.tasks=[mmbench]", f"mmbench.path={path}", f"eval.predictions={pred}"],
        tmp_path / "out",
        tiny_cache_dir,
        ckpt=str(tmp_path / "none"),
    )
    assert res["mmbench/overall"] == 40.0 and res["mmbench/vanilla"] == 60.0
    assert res["ckpt"] == "saved predictions"  # no model was loaded
    assert (tmp_path / "out" / "eval.md").read_text().startswith("\n| mmbench — generate")


def test_missing_answers_and_bad_config_are_clear(tmp_path, tiny_cache_dir):
    path = write_mmbench(tmp_path / "d")
    pred = write_predictions(tmp_path / "p.jsonl", {"0": "A"})
    with pytest.raises(ValueError, match="no answer for 8 of 9"):
        _eval(
            ["eval.tasks=[mmbench]", f"mmbench.path={path}", f"eval.predictions={pred}"],
            tmp_path / "out",
            tiny_cache_dir,
        )
    with pytest.raises(ValueError, match="pope.path="):
        _eval(["eval.tasks=[pope]"], tmp_path / "o2", tiny_cache_dir)
    with pytest.raises(ValueError, match="no such file"):
        _eval(["eval.tasks=[mmmu]", f"mmmu.path={tmp_path}/nope"], tmp_path / "o3", tiny_cache_dir)


def test_loglik_protocol_is_labelled(tmp_path, tiny_cache_dir, tiny_vlm_path):
    path = write_mmbench(tmp_path / "d")
    res = _eval(
        ["eval.tasks=[mmbench]", f"mmbench.path={path}", "mmbench.scoring=loglik"],
        tmp_path / "out",
        tiny_cache_dir,
        tiny_vlm_path,
    )
    assert "not comparable" in res["mmbench/protocol"]
    assert 0.0 <= res["mmbench/loglik/accuracy"] <= 100.0
    assert "mmbench/overall" not in res  # never mixed with the generated protocol's keys
    assert "not comparable to published tables" in (tmp_path / "out" / "eval.md").read_text()


@pytest.mark.dist
def test_two_gloo_processes_equal_one(tmp_path, tiny_vlm_path):
    """Each rank generates its shard; the gathered answers and scores equal one process's."""
    pope, images = write_pope(tmp_path / "pope")
    nodes = {
        "pope": {"path": str(pope / "coco_pope_random.json"), "image_root": str(images)},
        "mmbench": {"path": str(write_mmbench(tmp_path / "mmb"))},
    }
    (one,) = run_benchmarks(tmp_path, tiny_vlm_path, nodes, world=1)
    assert run_benchmarks(tmp_path, tiny_vlm_path, nodes, world=2) == [one, one]
    assert len(one["mmbench"]["answers"]) == 9 and len(one["pope"]["answers"]) == 4


# ------------------------------------------------------------------------- in-training callback
def test_callback_logs_curves_in_a_short_training_run(backbone, tmp_path):
    """Curves at steps 0, 2, 3 into benchmarks.csv and the logger (`bench/<task>/<metric>`);
    the last row equals scoring the trained policy directly."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from cwdpo.callbacks.benchmarks import BENCH_CSV, BenchmarkCurve, benchmark_summary
    from cwdpo.metrics.benchmarks.generate import generate_answers
    from cwdpo.metrics.benchmarks.registry import build_task, subset
    from cwdpo.utils.run_files import read_csv
    from tests.helpers import cpu_trainer, shapes_sft

    pope, images = write_pope(tmp_path / "pope")
    configs = {
        "pope": {"path": str(pope), "image_root": str(images), "max_new_tokens": 4},
        "mmbench": {"path": str(write_mmbench(tmp_path / "mmb")), "max_new_tokens": 4},
    }
    curve = BenchmarkCurve(
        tasks=["pope", "mmbench"], configs=configs, every_n_steps=2, n_items=1, stages=["sft_c"]
    )
    L.seed_everything(0)
    module, dm = shapes_sft(backbone, {"train": 12, "val": 4, "test": 4, "probe": 4}, 3)
    logger = CSVLogger(str(tmp_path / "logs"), name="", version="")
    trainer = cpu_trainer(tmp_path / "run", 3, [curve], logger=logger, log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)

    rows = read_csv(tmp_path / "run" / BENCH_CSV)
    steps = sorted({(r["task"], int(r["step"])) for r in rows})
    assert steps == [(t, s) for t in ("mmbench", "pope") for s in (0, 2, 3)]
    last = {r["metric"]: float(r["value"]) for r in rows if r["step"] == "3"}
    for task, node in configs.items():
        bench = build_task(task, node)
        items = subset(bench.read(), 1)
        direct = bench.score(items, generate_answers(backbone, items, 16, 4))
        for k, v in direct.items():
            assert last[k] == pytest.approx(v), k
    logged = read_csv(tmp_path / "logs" / "metrics.csv")
    f1 = [r["bench/pope/all/f1"] for r in logged if r.get("bench/pope/all/f1")]
    assert len(f1) == 3 and "bench/mmbench/overall" in logged[0]
    summary = benchmark_summary(trainer)
    assert summary["bench/pope/all/f1"] == last["pope/all/f1"]


def test_callback_failure_is_a_counted_warning(backbone, tmp_path):
    import lightning as L

    from cwdpo.callbacks.benchmarks import BENCH_CSV, BenchmarkCurve
    from cwdpo.utils.safe_log import FAILURES
    from tests.helpers import cpu_trainer, shapes_sft

    before = FAILURES.snapshot()
    curve = BenchmarkCurve(
        tasks=["mmmu"], configs={"mmmu": {"path": str(tmp_path / "missing")}}, stages=["sft_c"]
    )
    L.seed_everything(0)
    module, dm = shapes_sft(backbone, {"train": 8, "val": 4, "test": 4, "probe": 4}, 2)
    cpu_trainer(tmp_path, 2, [curve]).fit(module, datamodule=dm)
    assert FAILURES.since(before) == {"benchmark mmmu": 1}
    assert trainer_steps_ran(module) and not (tmp_path / BENCH_CSV).exists()
    with pytest.raises(ValueError, match="unknown benchmark"):
        BenchmarkCurve(tasks=["mme"])


def trainer_steps_ran(module) -> bool:
    return module.trainer.global_step == 2


# ------------------------------------------------------------------------------ every tiny family
def _families():
    from cwdpo.model.families import FAMILIES

    return list(FAMILIES)


@pytest.mark.families
@pytest.mark.parametrize("name", _families())
def test_every_family_runs_each_benchmark(name, tmp_path, tiny_cache_dir):
    """POPE (1 question per split), MMMU (1), MMBench (question 0: 4 rotations) from
    `cwdpo.eval` on the family's tiny build; re-scoring its saved answers gives the same."""
    from cwdpo.model.families import ensure_family

    path = ensure_family(name, tiny_cache_dir)
    over = ["eval.tasks=[pope,mmmu,mmbench]", "eval.batch_size=2", *bench_overrides(tmp_path)]
    res = _eval(over, tmp_path / "out", tiny_cache_dir, path)
    assert res["pope/random/n"] == res["pope/adversarial/n"] == 1.0
    assert res["mmmu/n"] == 1.0 and res["mmbench/n_rows"] == 4.0
    preds = "{" + ",".join(f"{t}:{tmp_path / 'out' / f'{t}.predictions.jsonl'}" for t in TASKS)
    again = _eval([*over, f"eval.predictions={preds}" + "}"], tmp_path / "re", tiny_cache_dir)
    for k, v in res.items():
        if k.split("/")[0] in TASKS and isinstance(v, float):
            assert again[k] == v, k


def test_pipeline_puts_the_curves_in_results_json(tmp_path, tiny_cache_dir):
    """`cwdpo.train` with callbacks.benchmarks: benchmarks.csv, the per-stage CSV logger's
    bench/<task>/<metric> columns and the last values in results.json."""
    from cwdpo.callbacks.benchmarks import BENCH_CSV
    from cwdpo.run.pipeline import run_pipeline
    from cwdpo.utils.run_files import read_csv

    pope, images = write_pope(tmp_path / "pope")
    over = [
        "+debug=fast",
        "eval.meteor=false",
        "callbacks.benchmarks.tasks=[pope]",
        "callbacks.benchmarks.every_n_steps=1",
        "callbacks.benchmarks.n_items=1",
        f"pope.path={pope}",
        f"pope.image_root={images}",
        "pope.max_new_tokens=4",
    ]
    out = tmp_path / "run"
    res = run_pipeline(compose_cfg(over, out, tiny_cache_dir))
    rows = read_csv(out / BENCH_CSV)
    assert sorted({int(r["step"]) for r in rows}) == [0, 1, 2]  # cw_dpo: 2 steps (+ start)
    last = {r["metric"]: float(r["value"]) for r in rows if r["step"] == "2"}
    assert res["stages"]["cw_dpo"]["bench/pope/all/f1"] == last["pope/all/f1"]
    logged = read_csv(out / "csv" / "cw_dpo" / "metrics.csv")
    assert any(r.get("bench/pope/all/accuracy") for r in logged)


@pytest.mark.families
@pytest.mark.parametrize("name", _families())
def test_every_family_runs_the_callback(name, tmp_path, tiny_cache_dir):
    """The in-training curve on each family's tiny build: one SFT step, POPE / MMMU / MMBench
    scored at the start and after the step."""

    from cwdpo.model.backbone import VLMBackbone
    from cwdpo.model.families import ensure_family

    pope, images = write_pope(tmp_path / "pope")
    configs = {
        "pope": {"path": str(pope), "image_root": str(images)},
        "mmmu": {"path": str(write_mmmu(tmp_path / "mmmu"))},
        "mmbench": {"path": str(write_mmbench(tmp_path / "mmb"))},
    }
    for node in configs.values():
        node["max_new_tokens"] = 3
    bb = VLMBackbone.from_pretrained(ensure_family(name, tiny_cache_dir), max_length=384)
    assert one_step_curve(bb, list(TASKS), configs, tmp_path / "run") == [
        (t, s) for t in sorted(TASKS) for s in ("0", "1")
    ]


# ------------------------------------------------------------------ torchrun-style cwdpo.eval
@pytest.mark.dist
def test_cwdpo_eval_on_two_processes_equals_one_and_writes_once(tmp_path, tiny_vlm_path):
    """`cwdpo.eval` launched as 2 ranks (torchrun's env: WORLD_SIZE, RANK, MASTER_*) joins a
    gloo group, shards generation and writes eval.json / predictions once, equal to 1 process."""
    over = bench_overrides(tmp_path / "data", limit=2)
    port = free_port()

    def launch(out: Path, rank: int, world: int):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        env |= {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank)}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "CUDA_VISIBLE_DEVICES": ""}
        args = [f"ckpt={tiny_vlm_path}", "eval.tasks=[pope,mmmu,mmbench]", *over]
        args += [f"paths.output_dir={out}", f"hydra.run.dir={out}"]
        return subprocess.Popen(
            [sys.executable, "-m", "cwdpo.eval", *args], env=env, stderr=subprocess.PIPE
        )

    for out, world in ((tmp_path / "one", 1), (tmp_path / "two", 2)):
        # rank 1 gets its own output dir: it must write nothing there (rank 0 writes)
        procs = [launch(out if r == 0 else out / f"rank{r}", r, world) for r in range(world)]
        for p in procs:
            _, err = p.communicate(timeout=400)
            assert p.returncode == 0, err.decode()[-3000:]
    assert not (tmp_path / "two" / "rank1" / "eval.json").exists()
    assert not list((tmp_path / "two" / "rank1").glob("*.predictions.jsonl"))
    one = json.loads((tmp_path / "one" / "eval.json").read_text())
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert {k: v for k, v in one.items() if k != "ckpt"} == {
        k: v for k, v in two.items() if k != "ckpt"
    }
    for t in TASKS:
        name = f"{t}.predictions.jsonl"
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text()


# ------------------------------------------------------------------------- MMBench HTTP judge
def test_option_judge_over_http(tmp_path, monkeypatch):
    """OptionJudge posts our matcher prompt to an OpenAI-compatible endpoint (key from the env)
    and reads the one-letter reply; MMBench asks it only for the unreadable answers."""
    from cwdpo.metrics.benchmarks.mmbench import MMBench, OptionJudge

    seen = []

    class Judge(FakeChatServer):
        def reply(self, body, headers, path):
            seen.append((path, headers.get("Authorization"), body))
            prompt = body["messages"][-1]["content"]
            return chat_reply("B" if "Model answer: A or B" in prompt else "Z")

    server = Judge()
    try:
        monkeypatch.setenv("MMB_KEY", "secret")
        bench = MMBench(path=str(write_mmbench(tmp_path)))
        bench.judge = OptionJudge(url=server.url, model="m", api_key_env="MMB_KEY")
        res = bench.score(bench.read(), mmbench_answers())
    finally:
        server.close()
    assert [s[0] for s in seen] == ["/v1/chat/completions"] * 2
    assert seen[0][1] == "Bearer secret" and seen[0][2]["model"] == "m"
    assert "Options:\nA. cat\nB. dog\nC. bird" in seen[0][2]["messages"][0]["content"]
    # question 2 ("A or B") judged B = right; question 3 judged Z = wrong: 3/5
    assert res["mmbench/overall"] == 60.0 and res["mmbench/judged"] == 2.0


def test_config_errors_before_any_model(tmp_path, tiny_cache_dir, monkeypatch):
    from cwdpo.run.config_schema import ConfigError, validate_config

    cfg = compose_cfg(["callbacks.benchmarks.tasks=[pope,mme]"], tmp_path, tiny_cache_dir)
    with pytest.raises(ConfigError, match=r"unknown benchmark .mme..*set pope.path="):
        validate_config(cfg, "train")
    path = write_mmbench(tmp_path / "d")
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    judge = "{_target_: cwdpo.metrics.benchmarks.mmbench.OptionJudge, url: u, model: m, "
    judge += "api_key_env: NO_SUCH_KEY}"
    with pytest.raises(ValueError, match="NO_SUCH_KEY"):
        _eval(
            ["eval.tasks=[mmbench]", f"mmbench.path={path}", f"mmbench.judge={judge}"],
            tmp_path / "o",
            tiny_cache_dir,
        )
    with pytest.raises(ValueError, match="one file but eval.tasks has 2 benchmark"):
        _eval(
            [
                "eval.tasks=[mmbench,mmmu]",
                f"mmbench.path={path}",
                f"mmmu.path={path}",
                f"eval.predictions={path}",
            ],
            tmp_path / "o2",
            tiny_cache_dir,
        )
