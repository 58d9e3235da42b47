"""Build the paper's stage-2 negatives offline: minimal perturbations written by an LLM.

`python -m cwdpo.perturb` reads a caption or pair file (`cwdpo.data.perturb_items`), asks an
OpenAI-compatible endpoint (`cwdpo.metrics.http_judge.ChatClient`: an API or a local vLLM /
llama.cpp server) to change one object, attribute, count or relation of each positive, checks
every answer (`cwdpo.data.perturbation_check`), re-asks with the reason when it is refused,
falls back to the rule-based edit (or drops the row) when the budget is spent, and appends
TRL-style pairs that `data=trl_pairs` trains on (`cwdpo.run.perturb_output`).

Real-service behaviour: `perturb.concurrency` requests in flight (threads; the main thread
alone writes), HTTP retries with back-off on 429 / 5xx / timeouts inside the client, a cost
cap (`perturb.max_rows` new rows per run), resumable output, a progress bar with rows/s and
the refusal counts, and a summary JSON of the run.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cwdpo.data.perturb_items import (
    PerturbItem,
    image_paths,
    kind_for,
    mine_vocab,
    pair_row,
    read_items,
    rule_perturbation,
)
from cwdpo.data.perturbation_check import REASONS, check_perturbation, check_text
from cwdpo.metrics.http_judge import ChatClient, HttpChatError
from cwdpo.run.perturb_config import validate_perturb_config
from cwdpo.run.perturb_output import PairOutput
from cwdpo.utils.io import atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What became of one row: kept (the model's answer), fell_back (the rule edit), dropped
    (refused, recorded as done) or failed (the request itself failed: redone on a rerun)."""

    item: PerturbItem
    status: str
    kind: str
    text: str | None = None
    reason: str | None = None
    answers: int = 0
    rejections: list[str] = field(default_factory=list)
    http_retries: list[str] = field(default_factory=list)
    stripped: int = 0
    error: str | None = None  # a failed request's message (URL, status; never the key)


class Perturber:
    """Asks for one row's perturbation until an answer passes the checks or the budget is
    spent, then falls back. Called from worker threads: it holds plain values (read from the
    config once, here) and only reads them."""

    def __init__(self, p: DictConfig, client: ChatClient, vocab: Any, seed: int) -> None:
        self.client, self.vocab, self.seed = client, vocab, seed
        self.kinds: dict[str, str] = dict(OmegaConf.to_container(p.kinds, resolve=True))
        self.attempts, self.max_edit_words = int(p.attempts), int(p.max_edit_words)
        self.fallback = str(p.fallback)
        self.prompts = {k: str(p[k]) for k in ("system_prompt", "prompt", "retry_prompt")}

    def values(self, item: PerturbItem, kind: str) -> dict[str, Any]:
        """What the prompt templates may name (`PLACEHOLDERS`)."""
        others = [f"- {r}" for r in item.references if r != item.chosen]
        return {
            "caption": item.chosen,
            "kind": kind,
            "kind_hint": self.kinds[kind],
            "references": "\n".join(others) if others else "(none)",
            "max_edit_words": self.max_edit_words,
            "prompt": item.prompt,
        }

    def messages(self, item: PerturbItem, kind: str) -> list[dict[str, str]]:
        values = self.values(item, kind)
        return [
            {"role": "system", "content": self.prompts["system_prompt"].format(**values)},
            {"role": "user", "content": self.prompts["prompt"].format(**values)},
        ]

    def __call__(self, item: PerturbItem) -> Outcome:
        kind = kind_for(item.key, list(self.kinds))
        out = Outcome(item, "dropped", kind)
        messages = self.messages(item, kind)
        for _ in range(self.attempts):
            try:
                answer = self.client.chat(messages, on_retry=out.http_retries.append)
            except HttpChatError as e:
                out.status, out.reason, out.error = "failed", f"request:{e.reason}", str(e)
                return out
            out.answers += 1
            v = check_perturbation(answer, item.chosen, item.references, self.max_edit_words)
            out.stripped += v.stripped
            if v.ok:
                out.status, out.text = "kept", v.text
                return out
            out.rejections.append(v.reason)
            feedback = self.prompts["retry_prompt"].format(
                reason=REASONS[v.reason], **self.values(item, kind)
            )
            messages = [
                *messages,
                {"role": "assistant", "content": answer},
                {"role": "user", "content": feedback},
            ]
        return self._fall_back(item, out)

    def _fall_back(self, item: PerturbItem, out: Outcome) -> Outcome:
        """The rule-based one-word edit (its own kind), or a drop naming why."""
        if self.fallback != "rule":
            out.reason = f"rejected:{out.rejections[-1]}"
            return out
        edit = rule_perturbation(item, self.vocab, self.seed, out.kind)
        if edit is None:
            out.reason = "no_rule_edit"
            return out
        text, kind = edit
        reason, _ = check_text(text, item.chosen, item.references, self.max_edit_words)
        if reason is not None:
            out.reason = f"rule:{reason}"
            return out
        out.status, out.text, out.kind = "fell_back", text, kind
        return out


class Tally:
    """The run's counts: the progress bar's postfix and the summary JSON."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after = stop_after  # consecutive failed rows that stop the run
        self.consecutive_failed = 0
        self.status: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.http_retries: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.retried = self.stripped = self.answers = 0

    def add(self, out: Outcome) -> None:
        self.status[out.status] += 1
        self.consecutive_failed = self.consecutive_failed + 1 if out.status == "failed" else 0
        self.rejections.update(out.rejections)
        self.http_retries.update(out.http_retries)
        self.retried += out.answers > 1
        self.stripped += out.stripped
        self.answers += out.answers
        if out.status in ("kept", "fell_back"):
            self.kinds[f"{'llm' if out.status == 'kept' else 'rule'}:{out.kind}"] += 1
        else:
            (self.dropped if out.status == "dropped" else self.failed)[out.reason or "?"] += 1

    def postfix(self) -> str:
        rej = " ".join(f"{k}={n}" for k, n in sorted(self.rejections.items()))
        return (
            f"kept {self.status['kept']} rule {self.status['fell_back']} "
            f"dropped {sum(self.dropped.values())} failed {sum(self.failed.values())}"
            + (f" | refused: {rej}" if rej else "")
        )

    def summary(self) -> dict[str, Any]:
        return {
            "kept": self.status["kept"],
            "retried": self.retried,
            "fell_back": self.status["fell_back"],
            "dropped": dict(sorted(self.dropped.items())),
            "request_failed": dict(sorted(self.failed.items())),  # left for the next run
            "rejections": dict(sorted(self.rejections.items())),
            "http_retries": dict(sorted(self.http_retries.items())),
            "stripped": self.stripped,
            "answers": self.answers,
            "kinds": dict(sorted(self.kinds.items())),
        }


def _record(out: Outcome, output: PairOutput, tally: Tally) -> None:
    """Write one finished row (main thread only): a pair, a dropped-ledger line, or nothing
    for a failed request (the row stays pending for the next run)."""
    tally.add(out)
    item = out.item
    if out.status in ("kept", "fell_back"):
        method = "llm" if out.status == "kept" else "rule"
        images = image_paths(item, output.image_dir)
        output.write_pair(pair_row(item, out.text, out.kind, method, images, out.answers))
    elif out.status == "dropped":
        detail = {"rejections": out.rejections, "source": item.source}
        output.write_dropped(item.key, out.reason, detail)
    else:
        log.warning("%s: %s (left for the next run)", item.key, out.error)


def _stop_reason(out: Outcome, tally: Tally) -> str | None:
    """Why the run must stop now, or None: a client error other than 429 (bad key, unknown
    model, wrong path) fails every row alike, and so, most likely, does a service that failed
    `perturb.max_consecutive_failures` rows in a row (down, unreachable, wrong URL)."""
    if out.status != "failed":
        return None
    code = (out.reason or "").removeprefix("request:http_")
    if code.isdigit() and 400 <= int(code) < 500 and code != "429":
        return "every request would fail alike"
    if tally.stop_after is not None and tally.consecutive_failed >= tally.stop_after:
        return f"{tally.consecutive_failed} rows in a row failed (perturb.max_consecutive_failures)"
    return None


def _progress(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=" rows", file=sys.stderr, dynamic_ncols=True, mininterval=0.2)


def _drive(
    todo: list[PerturbItem], work: Perturber, output: PairOutput, tally: Tally, n: int
) -> None:
    """At most `n` requests in flight; outcomes written as they finish (crash: only the rows
    in flight are lost)."""
    bar = _progress(len(todo))
    pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="perturb")
    queue = iter(todo)
    running: set[Future[Outcome]] = set()
    try:
        for item in queue:
            running.add(pool.submit(work, item))
            if len(running) < n:
                continue
            running = _collect(running, output, tally, bar)
        while running:
            running = _collect(running, output, tally, bar)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()


def _collect(
    running: set[Future[Outcome]], output: PairOutput, tally: Tally, bar: Any
) -> set[Future[Outcome]]:
    done, rest = wait(running, return_when=FIRST_COMPLETED)
    for fut in done:
        out = fut.result()
        _record(out, output, tally)
        bar.update(1)
        bar.set_postfix_str(tally.postfix(), refresh=False)
        why = _stop_reason(out, tally)
        if why is not None:
            raise HttpChatError(f"perturb: stopping, {why}: {out.error}", out.reason)
    return rest


def _items(cfg: DictConfig) -> tuple[str, list[PerturbItem]]:
    inp = cfg.input
    input_file = str(Path(inp.path).resolve())
    items = read_items(
        inp.format,
        input_file,
        inp.get("image_root"),
        splits=list(inp.get("splits") or ["train"]),
        captions_per_image=inp.captions_per_image,
        prompt=inp.prompt,
    )
    return input_file, items


def _client(p: DictConfig) -> ChatClient:
    options = p.get("request_options")
    return ChatClient(
        p.url,
        p.model,
        p.api_key_env,
        p.timeout,
        p.max_retries,
        p.backoff,
        OmegaConf.to_container(options, resolve=True) if options is not None else {},
    )


def run_perturb(cfg: DictConfig) -> dict[str, Any]:
    """Build (or resume) the pairs file; returns and writes the summary JSON (also when the
    run stops early: `finished` says which)."""
    validate_perturb_config(cfg)
    p = cfg.perturb
    input_file, items = _items(cfg)
    output = PairOutput(p.output, input_file)
    done = output.done
    pending = [it for it in items if it.key not in done]
    todo = pending if p.max_rows is None else pending[: p.max_rows]
    vocab = mine_vocab(items) if p.fallback == "rule" else None
    work = Perturber(p, _client(p), vocab, int(cfg.seed))
    log.info("%s: %d rows, %d done before, %d now", input_file, len(items), len(done), len(todo))
    tally, start, finished = Tally(p.max_consecutive_failures), time.monotonic(), False
    try:
        _drive(todo, work, output, tally, p.concurrency)
        finished = True
    finally:
        output.close()
        elapsed = time.monotonic() - start
        summary = {
            "input": input_file,
            "output": str(output.path),
            "model": p.model,
            "url": p.url,
            "finished": finished,
            "rows": len(items),
            "done_before": len(items) - len(pending),
            "this_run": len(todo),
            "left_by_max_rows": len(pending) - len(todo),
            **tally.summary(),
            "pairs_in_file": len(output.kept),
            "dropped_in_file": len(output.dropped),
            "elapsed_s": round(elapsed, 3),
            "rows_per_s": round(sum(tally.status.values()) / elapsed, 3) if elapsed > 0 else None,
        }
        atomic_write_json(output.summary_path, summary)
    return summary
