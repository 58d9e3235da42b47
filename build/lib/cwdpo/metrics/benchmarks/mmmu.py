"""MMMU (validation): generate an answer, parse it as the reference does, accuracy overall, per
subject and per discipline.

Files: the HF parquet shards (`<root>/<Subject>/validation-*.parquet`, columns `id, question,
options, question_type, answer, image_1..image_7, subfield`) or one shard. Prompt (lmms-eval's
default): the question, then for multiple choice the options as "A. text" lines and "Answer
with the option's letter from the given choices directly.", for open questions "Answer the
question using a single word or phrase.". The images are the ones the question and options
refer to (`<image k>`), in k order, each placed where its placeholder stands (lmms-eval keeps
the placeholder text and puts the images first; a row that refers to none gets all its images).
Parsing and matching: `mmmu_parse`. Subject = the id's middle part (`validation_Art_Theory_12`
→ Art_Theory), as lmms-eval groups it; disciplines as MMMU's six.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from cwdpo.data.multiple_choice import (
    IMAGE_PLACEHOLDER,
    _mmmu_images,
    _mmmu_options,
    _parquet_files,
    _parquet_rows,
)
from cwdpo.data.reading import require_path
from cwdpo.errors import DataError
from cwdpo.metrics.benchmarks.base import BenchItem, Benchmark, require_answers
from cwdpo.metrics.benchmarks.mmmu_parse import open_correct, parse_multi_choice, parse_open

MC_PROMPT = "Answer with the option's letter from the given choices directly."
OPEN_PROMPT = "Answer the question using a single word or phrase."
_SUBJECT = re.compile(r"^[^_]+_(.+?)_\d+$")
DISCIPLINES = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": (
        *("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine"),
        *("Pharmacy", "Public_Health"),
    ),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": (
        *("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics"),
        *("Energy_and_Power", "Materials", "Mechanical_Engineering"),
    ),
}
DISCIPLINE_OF = {s: d for d, subjects in DISCIPLINES.items() for s in subjects}


def mmmu_subject(qid: str, subfield: str = "") -> str:
    m = _SUBJECT.match(qid)
    return m.group(1) if m else subfield


def _gold(answer: Any, where: str) -> str | list[str]:
    """An open answer: a string, or a list of accepted strings (a cell holding a list)."""
    text = str(answer).strip()
    if text.startswith("["):
        try:
            val = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        if isinstance(val, list) and val:
            return [str(v) for v in val]
    if not text:
        raise DataError(f"{where}: field 'answer': expected the open answer, got ''")
    return text


class MMMU(Benchmark):
    """MMMU from local parquet: `path` = a shard or a directory (`split` keeps `<split>-*`)."""

    name = "mmmu"
    max_new_tokens = 32

    def __init__(self, path: str, split: str | None = "validation", seed: int = 42) -> None:
        self.path, self.split, self.seed = path, split, int(seed)

    def read(self) -> list[BenchItem]:
        root = require_path(self.path, "MMMU parquet file or directory")
        items = [
            self._item(row, i, f)
            for f in _parquet_files(root, None if root.is_file() else self.split)
            for i, row in enumerate(_parquet_rows(f))
        ]
        if not items:
            raise DataError(f"{root}: no MMMU questions")
        return items

    def _item(self, row: dict[str, Any], i: int, f: Any) -> BenchItem:
        qid = str(row["id"])
        where = f"{f}: row {i} (id={qid})"
        options = [o.strip() for o in _mmmu_options(row["options"], where)]
        kind = str(row.get("question_type") or ("multiple-choice" if options else "open"))
        if kind not in ("multiple-choice", "open"):
            raise DataError(f"{where}: field 'question_type': expected multiple-choice or open")
        if kind == "multiple-choice":
            if not options:
                raise DataError(f"{where}: field 'options': a multiple-choice row needs options")
            letters = [chr(ord("A") + k) for k in range(len(options))]
            answer: Any = str(row["answer"]).strip()
            if answer not in letters:
                raise DataError(
                    f"{where}: field 'answer': expected one of {letters}, got {answer!r}"
                )
            listed = "\n".join(f"{c}. {o}" for c, o in zip(letters, options))
            text = f"{row['question']}\n{listed}\n\n{MC_PROMPT}"
        else:
            answer = _gold(row["answer"], where)
            text = f"{row['question']}\n\n{OPEN_PROMPT}"
        images, numbers = _mmmu_images(row, f, qid, where, options)
        used = sorted({int(k) for k in IMAGE_PLACEHOLDER.findall(text)})
        if used:
            images = [images[numbers.index(k)] for k in used]
            text = IMAGE_PLACEHOLDER.sub(lambda m: f"<image {used.index(int(m[1])) + 1}>", text)
        if not images:
            raise DataError(f"{where}: no image (image_1..image_7 are empty)")
        subject = mmmu_subject(qid, str(row.get("subfield") or ""))
        meta = {"question_type": kind, "options": options, "answer": answer, "subject": subject}
        return BenchItem(id=qid, images=images, prompt=text, meta=meta)

    def correct(self, item: BenchItem, answer: str) -> bool:
        m = item.meta
        if m["question_type"] == "multiple-choice":
            return parse_multi_choice(answer, m["options"], self.seed, item.id) == m["answer"]
        return open_correct(m["answer"], parse_open(answer))

    def score(self, items: Sequence[BenchItem], answers: Mapping[str, str]) -> dict[str, float]:
        texts = require_answers(self.name, items, answers)
        groups: dict[str, list[bool]] = defaultdict(list)
        for it, text in zip(items, texts):
            ok = self.correct(it, text)
            subject = it.meta["subject"]
            groups["accuracy"].append(ok)
            groups[f"accuracy/{it.meta['question_type']}"].append(ok)
            groups[f"subject/{subject}"].append(ok)
            if subject in DISCIPLINE_OF:
                groups[f"discipline/{DISCIPLINE_OF[subject]}"].append(ok)
        order = sorted(groups, key=lambda k: (k != "accuracy", k))
        out = {f"mmmu/{k}": 100.0 * sum(groups[k]) / len(groups[k]) for k in order}
        out["mmmu/n"] = float(len(items))
        return out
