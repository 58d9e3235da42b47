"""MMBench (VLMEvalKit TSV) with CircularEval: generate, extract one option, group rotations.

Extraction follows VLMEvalKit's `can_infer` (our own code): first `can_infer_option` — replace
the characters `.()[],:;!*#{}` by spaces, split on whitespace; exactly one option letter among
the words → that letter; a refusal phrase, or no letter but a lone "Z", → "Z" (wrong); else
`can_infer_text` — the lower-cased option texts contained in the lower-cased answer: exactly
one → its letter. Answers neither rule reads go to the optional judge (`judge`, an LLM that
picks the option closest to the answer or Z, as VLMEvalKit's ChatGPT matcher does); without a
judge they count as wrong (VLMEvalKit's `exact_matching`). Two letters ("A or B") are
unreadable, as there.

CircularEval: the TSV holds each question's rotations as rows whose `index` differ by
multiples of 1e6; a question counts only if every row of its group (`index % 1e6`) is right.
Metrics (percent): `mmbench/overall` (circular), per category and per l2-category (circular),
`mmbench/vanilla` (per-row accuracy of the original rows, index < 1e6), `mmbench/unparsed`
(share of rows no rule or judge could read).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from cwdpo.data.multiple_choice import CIRCULAR_OFFSET, read_mmbench
from cwdpo.metrics.benchmarks.base import BenchItem, Benchmark, require_answers

POST_PROMPT = "Answer with the option's letter from the given choices directly."
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)


def can_infer_option(answer: str, letters: Sequence[str]) -> str | None:
    """The one option letter written as a word of `answer`, "Z" for a refusal, else None."""
    if any(r in answer for r in REFUSALS):
        return "Z"
    for ch in ".()[],:;!*#{}":
        answer = answer.replace(ch, " ")
    words = answer.split()
    hits = [c for c in letters if c in words]
    if len(hits) == 1:
        return hits[0]
    if not hits and "Z" in words:
        return "Z"
    return None


def can_infer_text(answer: str, options: Mapping[str, str]) -> str | None:
    """The one option whose text (lower-cased) appears in the lower-cased answer, else None."""
    low = answer.lower()
    hits = [k for k, v in options.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def can_infer(answer: str, options: Mapping[str, str]) -> str | None:
    return can_infer_option(answer, list(options)) or can_infer_text(answer, options)


def circular_group(index: str) -> str:
    return str(int(index) % CIRCULAR_OFFSET) if index.isdigit() else index


class MMBench(Benchmark):
    """MMBench from a local TSV (`path`); `judge` (set by the runner) reads what rules cannot."""

    name = "mmbench"
    max_new_tokens = 32

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> list[BenchItem]:
        items = []
        for q in read_mmbench(self.path):
            lines = [q.hint] if q.hint else []
            lines += [q.question, *(f"{k}. {v}" for k, v in q.options.items()), POST_PROMPT]
            meta = {
                "options": dict(q.options),
                "answer": q.answer,
                "question": q.question,
                "category": q.category,
                "l2": q.meta.get("l2-category", ""),
                "group": circular_group(q.qid),
            }
            items.append(BenchItem(id=q.qid, images=[q.image], prompt="\n".join(lines), meta=meta))
        return items

    def extract(self, item: BenchItem, answer: str) -> tuple[str | None, bool]:
        """(the letter read from `answer` or None, whether the judge read it)."""
        letter = can_infer(answer, item.meta["options"])
        if letter is None and self.judge is not None:
            return self.judge.choose(item.meta["question"], item.meta["options"], answer), True
        return letter, False

    def score(self, items: Sequence[BenchItem], answers: Mapping[str, str]) -> dict[str, float]:
        texts = require_answers(self.name, items, answers)
        groups: dict[str, list[bool]] = defaultdict(list)
        first: dict[str, BenchItem] = {}
        vanilla: list[bool] = []
        unparsed = judged = 0
        for it, text in zip(items, texts):
            letter, by_judge = self.extract(it, text)
            unparsed += letter is None
            judged += by_judge
            ok = letter is not None and letter == it.meta["answer"]
            groups[it.meta["group"]].append(ok)
            first.setdefault(it.meta["group"], it)
            if not it.id.isdigit() or int(it.id) < CIRCULAR_OFFSET:
                vanilla.append(ok)
        per: dict[str, list[bool]] = defaultdict(list)
        for g, oks in groups.items():
            ok, m = all(oks), first[g].meta
            per["overall"].append(ok)
            if m["category"]:
                per[f"category/{m['category']}"].append(ok)
            if m["l2"]:
                per[f"l2/{m['l2']}"].append(ok)
        out = {f"mmbench/{k}": 100.0 * sum(v) / len(v) for k, v in per.items()}
        out["mmbench/vanilla"] = 100.0 * sum(vanilla) / max(len(vanilla), 1)
        out["mmbench/unparsed"] = 100.0 * unparsed / len(items)
        out["mmbench/n_questions"] = float(len(groups))
        out["mmbench/n_rows"] = float(len(items))
        if self.judge is not None:
            out["mmbench/judged"] = float(judged)
        return out


def judge_letter(reply: str, letters: Sequence[str]) -> str | None:
    """A judge reply read as one option letter or "Z" (no option fits); anything else None."""
    hit = can_infer_option(reply.strip(), [*letters, "Z"])
    return hit if hit in (*letters, "Z") else None


def judge_prompt(question: str, options: Mapping[str, str], prediction: str) -> str:
    """Our wording of the matcher task VLMEvalKit gives its judge."""
    listed = "\n".join(f"{k}. {v}" for k, v in options.items())
    return (
        "A model answered a multiple-choice question in free text. Decide which option its "
        "answer means. If it matches none of the options, or several, reply Z.\n\n"
        f"Question: {question}\nOptions:\n{listed}\nModel answer: {prediction}\n\n"
        f"Reply with one character: {', '.join(options)} or Z."
    )


class OptionJudge:
    """MMBench's optional matcher behind the project's OpenAI-compatible HTTP judge
    (`cwdpo.metrics.http_judge.HttpJudge`: same endpoint, key handling and retries)."""

    def __init__(self, **http: Any) -> None:
        from cwdpo.metrics.http_judge import HttpJudge

        self.http = HttpJudge(**http)
        self.n_unparsed = 0

    def choose(self, question: str, options: Mapping[str, str], prediction: str) -> str | None:
        payload = {
            "model": self.http.model,
            "messages": [{"role": "user", "content": judge_prompt(question, options, prediction)}],
            **self.http.request_options,
        }
        data = self.http._post(payload)
        try:
            reply = str(data["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            reply = ""
        letter = judge_letter(reply, list(options))
        self.n_unparsed += letter is None
        return letter
