"""`cwdpo.eval`'s benchmark tasks (POPE, CHAIR, AMBER, MMHal-Bench, MMMU, MMBench —
`metrics.benchmarks.registry`):
read the task's local files, generate (each DDP rank its shard) or load a saved predictions
file, score by the benchmark's official rules, save `<out>/<task>.predictions.jsonl`.

`<task>.scoring=loglik` (MMBench, MMMU) scores the options by log-likelihood instead — the
older protocol of `eval.tasks=[multiple_choice]`, kept for comparisons inside this project and
labelled in the results as not comparable to published tables (which generate and parse).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cwdpo.errors import DataError
from cwdpo.metrics.benchmarks.base import BenchItem
from cwdpo.metrics.benchmarks.generate import generate_answers, score_answers
from cwdpo.metrics.benchmarks.registry import (
    BENCHMARKS,
    build_benchmark,
    build_task,
    files_configured,
    judge_missing_message,
    no_files_message,
    subset,
)
from cwdpo.utils.dist import rank_world
from cwdpo.utils.io import atomic_write_text

log = logging.getLogger(__name__)

LOGLIK_LABEL = "option log-likelihood (not comparable to published tables)"
GENERATE_LABEL = "generate + parse (official rules)"
SCORINGS = ("generate", "loglik")


def read_predictions(path: str | Path) -> dict[str, str]:
    """{id: answer} from a JSONL file of `{"id", "answer"}` rows; a bad or repeated row is an
    error naming the line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"predictions file not found: {p}")
    out: dict[str, str] = {}
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: line {i}: not JSON: {e}") from e
        if not isinstance(row, dict) or "id" not in row or "answer" not in row:
            raise DataError(
                f"{p}: line {i}: expected an object with 'id' and 'answer', got {row!r:.80}"
            )
        key = str(row["id"])
        if key in out:
            raise DataError(f"{p}: line {i}: id {key!r} appears twice")
        out[key] = str(row["answer"])
    return out


def write_predictions(path: Path, items: Sequence[BenchItem], answers: Mapping[str, str]) -> None:
    rows = [json.dumps({"id": it.id, "answer": answers[it.id]}, ensure_ascii=False) for it in items]
    atomic_write_text(path, "\n".join(rows) + "\n")


def task_node(cfg: Any, name: str) -> dict[str, Any]:
    """The task's config node as a plain dict (empty when absent)."""
    from omegaconf import OmegaConf

    node = cfg.get(name) if hasattr(cfg, "get") else None
    if node is None:
        return {}
    return dict(OmegaConf.to_container(node, resolve=True)) if not isinstance(node, dict) else node


def predictions_for(cfg: Any, name: str, tasks: Sequence[str]) -> str | None:
    """The saved predictions file to re-score for task `name`: `<name>.predictions`, or
    `eval.predictions` (a {task: file} mapping, or one file when one benchmark task runs)."""
    own = task_node(cfg, name).get("predictions")
    if own:
        return str(own)
    given = cfg.eval.get("predictions") if cfg.get("eval") is not None else None
    if not given:
        return None
    if isinstance(given, str):
        benches = [t for t in tasks if t in BENCHMARKS]
        if len(benches) != 1:
            raise ValueError(
                f"eval.predictions={given!r} is one file but eval.tasks has {len(benches)} "
                f"benchmark tasks {benches}; give eval.predictions={{task: file, ...}}"
            )
        return given
    return str(given[name]) if name in given and given[name] else None


def needs_model(cfg: Any, tasks: Sequence[str]) -> bool:
    """Whether any task needs the checkpoint (a benchmark re-scored from files does not)."""
    return any(t not in BENCHMARKS or not predictions_for(cfg, t, tasks) for t in tasks)


def judge_errors(name: str, node: Mapping[str, Any]) -> list[str]:
    """A task's `judge` node, checked before any model loads: present when the benchmark needs
    one (MMHal-Bench), `url` / `model` set, its `api_key_env` exported."""
    judge = node.get("judge")
    if not judge:
        return [judge_missing_message(name)] if BENCHMARKS[name].needs_judge else []
    if not isinstance(judge, Mapping):  # an object passed from Python
        return []
    unset = [] if judge.get("_target_") else ["_target_"]
    unset += [k for k in ("url", "model") if k in judge and judge[k] in (None, "")]
    errors = [f"{name}.judge.{k} is not set" for k in unset]
    key_env = judge.get("api_key_env")
    if key_env and not os.environ.get(key_env):
        errors.append(
            f"{name}.judge: the environment variable {key_env} (api_key_env) is not set; "
            "export it, or set api_key_env=null for a server without auth"
        )
    return errors


def check_task(name: str, node: Mapping[str, Any]) -> None:
    """What would stop task `name` after the model loaded, raised now: no files, a bad key, a
    missing file or optional dependency (`Benchmark.check`), a judge not configured."""
    if not files_configured(name, node):
        raise ValueError(no_files_message(name))
    build_benchmark(name, node).check()
    errors = judge_errors(name, node)
    if errors:
        raise ValueError("; ".join(errors))


def callback_config_errors(cfg: Any) -> list[str]:
    """`callbacks.benchmarks.tasks` of a train config: known names, each configured."""
    from omegaconf import OmegaConf

    tasks = OmegaConf.select(cfg, "callbacks.benchmarks.tasks")
    if tasks is None:
        return []
    errors = [
        f"callbacks.benchmarks.tasks: unknown benchmark {t!r}; expected one of {sorted(BENCHMARKS)}"
        for t in tasks
        if t not in BENCHMARKS
    ]
    for t in tasks:
        if t in BENCHMARKS:
            try:
                check_task(t, task_node(cfg, t))
            except (ValueError, RuntimeError) as e:  # DataError is a ValueError
                errors.append(f"callbacks.benchmarks.tasks has {t}: {e}")
    return errors


def check_tasks(cfg: Any, tasks: Sequence[str]) -> None:
    """Every benchmark task configured, its files present, its optional dependencies and
    judge (API key) ready — before a model loads."""
    for name in tasks:
        if name in BENCHMARKS:
            check_task(name, task_node(cfg, name))
            pred = predictions_for(cfg, name, tasks)
            if pred and not Path(pred).is_file():
                raise DataError(f"{name}: predictions file not found: {pred}")


def run_benchmark(
    name: str,
    node: Mapping[str, Any],
    backbone: Any,
    out_dir: Path | None,
    batch_size: int = 16,
    predictions: str | None = None,
) -> dict[str, Any]:
    """One benchmark task: metrics (`<name>/...`) + `<name>/protocol`."""
    scoring = str(node.get("scoring") or "generate")
    if scoring not in SCORINGS:
        raise ValueError(f"{name}.scoring must be one of {SCORINGS}, got {scoring!r}")
    if scoring == "loglik":
        return loglik_benchmark(name, node, backbone, batch_size)
    bench = build_task(name, node)
    items = subset(bench.read(), node.get("limit"))
    if predictions:
        answers = read_predictions(predictions)
    else:
        answers = generate_answers(
            backbone, items, int(node.get("batch_size") or batch_size), bench.max_new_tokens
        )
    res: dict[str, Any] = dict(score_answers(bench, items, answers))
    note = bench.protocol_note()
    res[f"{name}/protocol"] = f"{GENERATE_LABEL}; {note}" if note else GENERATE_LABEL
    if predictions:
        res[f"{name}/predictions"] = str(predictions)
    elif out_dir is not None and rank_world()[0] == 0:
        write_predictions(Path(out_dir) / f"{name}.predictions.jsonl", items, answers)
    replies = getattr(bench, "replies", None)  # MMHal's judge replies (rank 0 scored)
    if replies and out_dir is not None and rank_world()[0] == 0:
        rows = [{"id": k, "reply": r, "rating": g} for k, (r, g) in replies.items()]
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        atomic_write_text(Path(out_dir) / f"{name}.judge.jsonl", text)
    return res


def loglik_benchmark(
    name: str, node: Mapping[str, Any], backbone: Any, batch_size: int
) -> dict[str, Any]:
    """MMBench / MMMU multiple choice scored by option log-likelihood (letter), rotations of
    an MMBench question grouped as in CircularEval."""
    from cwdpo.data.multiple_choice import read_mmbench, read_mmmu
    from cwdpo.metrics.benchmarks.mmbench import circular_group
    from cwdpo.metrics.benchmarks.mmmu import mmmu_subject
    from cwdpo.metrics.multiple_choice import MultipleChoiceAccuracy
    from cwdpo.run.evaluation import predict_multiple_choice

    if name == "mmbench":
        qs = read_mmbench(node["path"])
        groups, cats = [circular_group(q.qid) for q in qs], [q.category for q in qs]
    elif name == "mmmu":
        qs = read_mmmu(node["path"], split=node.get("split"))
        groups, cats = [q.qid for q in qs], [mmmu_subject(q.qid, q.category) for q in qs]
    else:
        raise ValueError(f"{name}.scoring=loglik: only mmbench and mmmu have options to score")
    preds = predict_multiple_choice(backbone, qs, "letter", batch_size)
    m = MultipleChoiceAccuracy()
    m.update(preds, [q.answer for q in qs], cats, groups)
    res: dict[str, Any] = {f"{name}/loglik/{k}": float(v) for k, v in m.compute().items()}
    res[f"{name}/protocol"] = LOGLIK_LABEL
    return res


def run_benchmarks(cfg: Any, backbone: Any, tasks: Sequence[str]) -> dict[str, Any]:
    """Every benchmark task of `tasks`, in order."""
    out_dir = Path(cfg.paths.output_dir)
    res: dict[str, Any] = {}
    for name in tasks:
        if name in BENCHMARKS:
            res.update(
                run_benchmark(
                    name,
                    task_node(cfg, name),
                    backbone,
                    out_dir,
                    int(cfg.eval.batch_size),
                    predictions_for(cfg, name, tasks),
                )
            )
    return res


def benchmark_table(results: Mapping[str, Any]) -> str:
    """eval.md's benchmark section: one table per task, headed by its protocol."""
    text = ""
    for name in BENCHMARKS:
        rows = {
            k: v
            for k, v in results.items()
            if k.startswith(f"{name}/") and isinstance(v, int | float)
        }
        if rows:
            text += f"\n| {name} — {results.get(f'{name}/protocol', '')} | value |\n|---|---|\n"
            text += "".join(f"| {k} | {v:.2f} |\n" for k, v in rows.items())
    return text
