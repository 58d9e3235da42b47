"""POPE (Li et al. 2023): yes/no object-presence questions on COCO val2014, three splits.

Read from the official JSONL files (`coco_pope_<split>.json(l)`, rows `question_id, image,
text, label`; images under `image_root`) or from lmms-eval's `lmms-lab/POPE` parquet (`question,
answer, category, image{bytes}`). Scored by the official rule of POPE's `evaluate.py`: keep the
text before the first ".", drop commas, split on spaces; the answer is "no" iff a word is
exactly "No", "no" or "not", else "yes". So "I don't know" and "NO" count as *yes*, as they do
in the published tables. Metrics in percent, yes = positive: accuracy, precision, recall, F1,
yes-ratio of the predictions, per split; `pope/all/*` pools every item (lmms-eval's `pope`
task), `pope/mean/*` averages the splits (the "average" column of papers).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cwdpo.data.reading import require_path
from cwdpo.data.records import ImageRef
from cwdpo.errors import DataError
from cwdpo.metrics.benchmarks.base import BenchItem, Benchmark, require_answers

SPLITS = ("random", "popular", "adversarial")
#: LLaVA's short-answer suffix, which lmms-eval's POPE prompt uses too
DEFAULT_SUFFIX = "\nAnswer the question using a single word or phrase."
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def pope_answer(text: str) -> str:
    """The official yes/no reading of a generated answer (POPE's evaluate.py)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def binary_metrics(preds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio (percent) with yes as the positive class.
    A zero denominator (no predicted or no true yes) gives 0 where the reference would divide
    by zero."""
    tp = sum(p == "yes" and y == "yes" for p, y in zip(preds, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(preds, labels))
    tn = sum(p == "no" and y == "no" for p, y in zip(preds, labels))
    fn = sum(p == "no" and y == "yes" for p, y in zip(preds, labels))
    n = max(len(preds), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * (tp + tn) / n,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * (tp + fp) / n,
    }


class POPE(Benchmark):
    """POPE from local files: `path` = a directory holding `coco_pope_<split>.json(l)` (or
    parquet shards), or one such file; `image_root` = the COCO val2014 image directory (JSONL
    rows name their image file)."""

    name = "pope"
    max_new_tokens = 16

    def __init__(
        self,
        path: str,
        image_root: str | None = None,
        splits: Sequence[str] = SPLITS,
        prompt_suffix: str = DEFAULT_SUFFIX,
    ) -> None:
        unknown = [s for s in splits if s not in SPLITS]
        if unknown:
            raise ValueError(f"pope.splits: unknown split(s) {unknown}; choose from {SPLITS}")
        self.path, self.image_root = path, image_root
        self.splits, self.prompt_suffix = list(splits), prompt_suffix

    def read(self) -> list[BenchItem]:
        root = require_path(self.path, "POPE file or directory")
        items: list[BenchItem] = []
        for split, f in self._files(root):
            items += self._read_parquet(f) if split is None else self._read_jsonl(f, split)
        if not items:
            raise DataError(f"{root}: no POPE questions for splits {self.splits}")
        seen: set[str] = set()
        for it in items:
            if it.id in seen:
                raise DataError(f"{root}: duplicate POPE question id {it.id!r}")
            seen.add(it.id)
        return items

    def _files(self, root: Path) -> list[tuple[str | None, Path]]:
        """(split, file): a file's split is named in it (`coco_pope_<split>`); parquet shards
        carry theirs in a `category` column (None here)."""
        files = [root] if root.is_file() else sorted(root.rglob("*"))
        out: list[tuple[str | None, Path]] = []
        for f in files:
            if f.suffix == ".parquet":
                out.append((None, f))
            elif f.suffix in (".json", ".jsonl"):
                split = next((s for s in SPLITS if s in f.stem), None)
                if split is None and root.is_file():
                    raise DataError(f"{f}: cannot tell the POPE split from the file name")
                if split in self.splits:
                    out.append((split, f))
        return out

    def _item(self, qid: Any, split: str, image: ImageRef, text: str, label: Any, where: str):
        label = str(label).strip().lower()
        if label not in ("yes", "no"):
            raise DataError(f"{where}: field 'label': expected 'yes' or 'no', got {label!r}")
        return BenchItem(
            id=f"{split}/{qid}",
            images=[image],
            prompt=f"{str(text).strip()}{self.prompt_suffix}",
            meta={"split": split, "label": label},
        )

    def _read_jsonl(self, f: Path, split: str) -> list[BenchItem]:
        if self.image_root is None:
            raise DataError(f"{f}: POPE JSONL rows name image files; set pope.image_root")
        out = []
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            where = f"{f}: line {i + 1}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not a JSON object: {e}") from e
            missing = [k for k in ("question_id", "image", "text", "label") if k not in row]
            if missing:
                raise DataError(f"{where}: missing field(s) {missing}; found {list(row)}")
            image = ImageRef(path=str(Path(self.image_root) / row["image"]), name=row["image"])
            out.append(
                self._item(row["question_id"], split, image, row["text"], row["label"], where)
            )
        return out

    def _read_parquet(self, f: Path) -> list[BenchItem]:
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(f).to_pylist()
        except Exception as e:
            raise DataError(f"{f}: cannot read parquet: {e}") from e
        out = []
        for i, row in enumerate(rows):
            where = f"{f}: row {i}"
            missing = [k for k in ("question_id", "question", "answer", "category", "image")]
            missing = [k for k in missing if k not in row]
            if missing:
                raise DataError(f"{where}: missing field(s) {missing}; found {list(row)}")
            split = str(row["category"])
            if split not in self.splits:
                continue
            data = (row["image"] or {}).get("bytes") if isinstance(row["image"], dict) else None
            if not data:
                raise DataError(f"{where}: field 'image': expected an image struct with bytes")
            image = ImageRef(data=bytes(data), name=f"{f}: row {i}")
            out.append(
                self._item(row["question_id"], split, image, row["question"], row["answer"], where)
            )
        return out

    def score(self, items: Sequence[BenchItem], answers: Mapping[str, str]) -> dict[str, float]:
        texts = require_answers(self.name, items, answers)
        preds = [pope_answer(t) for t in texts]
        labels = [it.meta["label"] for it in items]
        out: dict[str, float] = {}
        per_split = []
        for split in self.splits:
            idx = [i for i, it in enumerate(items) if it.meta["split"] == split]
            if not idx:
                continue
            m = binary_metrics([preds[i] for i in idx], [labels[i] for i in idx])
            per_split.append(m)
            out |= {f"pope/{split}/{k}": v for k, v in m.items()}
            out[f"pope/{split}/n"] = float(len(idx))
        out |= {f"pope/all/{k}": v for k, v in binary_metrics(preds, labels).items()}
        out |= {f"pope/mean/{k}": sum(m[k] for m in per_split) / len(per_split) for k in METRICS}
        return out
