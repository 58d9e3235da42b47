"""Benchmark fixtures in the official on-disk formats (POPE JSONL + COCO image files, lmms-lab
POPE parquet, MMMU validation parquet, MMBench TSV with base64 images and circular copies),
each with hand-written answers that exercise the parsing rules. Expected scores are computed by
hand in tests/test_benchmarks.py."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from tests.formats import image_bytes, write_image

# ------------------------------------------------------------------------------------- POPE
#: (split, question_id, image k, question, label, answer)
POPE_ROWS = [
    ("random", 1, 0, "Is there a dog in the image?", "yes", "Yes, there is a dog."),
    ("random", 2, 1, "Is there a cat in the image?", "no", "No."),
    ("random", 3, 1, "Is there a cat in the image?", "no", "There is no cat"),
    ("random", 4, 2, "Is there a car in the image?", "no", "I don't know"),
    ("popular", 1, 0, "Is there a person in the image?", "yes", "Not that I can see."),
    ("popular", 2, 2, "Is there a chair in the image?", "yes", "no, it is not there"),
    ("adversarial", 1, 1, "Is there a fork in the image?", "no", "Yes. But no dog."),
    ("adversarial", 2, 0, "Is there a bowl in the image?", "yes", "yes"),
]


def write_pope(root: Path) -> tuple[Path, Path]:
    """The POPE repo's layout: `<root>/coco_pope_<split>.json` (JSONL despite the name) and
    the COCO images under `<root>/val2014/`. Returns (data dir, image root)."""
    images = root / "val2014"
    for split in ("random", "popular", "adversarial"):
        lines = []
        for s, qid, k, text, label, _ in POPE_ROWS:
            if s == split:
                name = f"COCO_val2014_{k:012d}.jpg"
                write_image(images / name, k)
                row = {"question_id": qid, "image": name, "text": text, "label": label}
                lines.append(json.dumps(row))
        (root / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
    return root, images


def write_pope_parquet(root: Path) -> Path:
    """lmms-lab/POPE's parquet columns: id, question_id, question, answer, image_source,
    image{bytes,path}, category."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "id": str(i),
            "question_id": str(qid),
            "question": text,
            "answer": label,
            "image_source": f"COCO_val2014_{k:012d}",
            "image": {"bytes": image_bytes(k, "JPEG"), "path": None},
            "category": split,
        }
        for i, (split, qid, k, text, label, _) in enumerate(POPE_ROWS)
    ]
    path = root / "data" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def pope_answers() -> dict[str, str]:
    return {f"{s}/{qid}": ans for s, qid, _, _, _, ans in POPE_ROWS}


# ------------------------------------------------------------------------------------- MMMU
def _mmmu_row(qid: str, question: str, options: list[str], answer: str, images: dict) -> dict:
    row: dict[str, Any] = {f"image_{k}": None for k in range(1, 8)}
    row |= {
        "id": qid,
        "question": question,
        "options": repr(options),
        "explanation": "",
        "img_type": "['Diagrams']",
        "answer": answer,
        "topic_difficulty": "Easy",
        "question_type": "multiple-choice" if options else "open",
        "subfield": "Sub",
    }
    for k, pal in images.items():
        row[f"image_{k}"] = {"bytes": image_bytes(pal), "path": f"{qid}_{k}.png"}
    return row


COLOURS = ["red", "green", "blue", "black"]
#: (row, answer)
MMMU_ROWS = [
    (_mmmu_row("validation_Art_1", "<image 1> Which colour?", COLOURS, "A", {1: 0}), "(B)"),
    (
        _mmmu_row("validation_Art_2", "What is in <image 2>?", COLOURS, "C", {1: 1, 2: 2}),
        "The answer is C because the sky is blue",
    ),
    (
        _mmmu_row(
            "validation_Math_3",
            "<image 1> What is drawn?",
            ["4 apples", "seven pears", "a circle", "nine"],
            "B",
            {1: 3},
        ),
        "I think there are seven pears in the picture",
    ),
    (_mmmu_row("validation_Math_4", "<image 1> Pick one.", COLOURS, "A", {1: 4}), "A or B"),
    (_mmmu_row("validation_Math_5", "<image 1> Pick one.", COLOURS, "D", {1: 5}), "hmm"),
    (
        _mmmu_row("validation_Physics_6", "<image 1> How fast (m/s)?", [], "12.5", {1: 0}),
        "The speed is 12.5 m/s",
    ),
    (_mmmu_row("validation_Physics_7", "<image 1> Mass in kg?", [], "1,000", {1: 1}), "1000 kg"),
    (_mmmu_row("validation_Physics_8", "<image 1> Length?", [], "3", {1: 2}), "about 5 meters"),
]


def write_mmmu(root: Path) -> Path:
    """The HF MMMU layout: `<root>/<Subject>/validation-00000-of-00001.parquet`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    by_subject: dict[str, list[dict]] = {}
    for row, _ in MMMU_ROWS:
        by_subject.setdefault(row["id"].split("_")[1], []).append(row)
    for subject, rows in by_subject.items():
        fields = [(c, img_t if c.startswith("image_") else pa.string()) for c in rows[0]]
        path = root / subject / "validation-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), path)
    return root


def mmmu_answers() -> dict[str, str]:
    return {row["id"]: ans for row, ans in MMMU_ROWS}


# ----------------------------------------------------------------------------------- MMBench
def _mmb(index: int, question: str, opts: list[str], answer: str, cat: str, image: Any) -> dict:
    row = {"index": index, "question": question, "hint": "", "answer": answer}
    row |= {c: (opts[i] if i < len(opts) else "") for i, c in enumerate("ABCD")}
    img = str(image) if index >= 1_000_000 else base64.b64encode(image_bytes(image)).decode()
    return row | {"category": cat, "l2-category": f"l2_{cat}", "image": img}


#: (row, answer): question 0 and its 3 rotations all right; question 1 with one rotation
#: wrong; 2: two letters (unreadable); 3: no letter, no option text; 4: option text only
MMBENCH_ROWS = [
    (_mmb(0, "Main colour?", ["red", "green", "blue", "yellow"], "A", "color", 0), "A"),
    (_mmb(1000000, "Main colour?", ["green", "blue", "yellow", "red"], "D", "color", 0), "(D)"),
    (
        _mmb(2000000, "Main colour?", ["blue", "yellow", "red", "green"], "C", "color", 0),
        "The answer is C because it is red",
    ),
    (_mmb(3000000, "Main colour?", ["yellow", "red", "green", "blue"], "B", "color", 0), "red"),
    (_mmb(1, "Is it bright?", ["yes", "no"], "A", "color", 1), "A"),
    (_mmb(1000001, "Is it bright?", ["no", "yes"], "B", "color", 1), "A"),
    (_mmb(2, "Which animal?", ["cat", "dog", "bird"], "B", "scene", 2), "A or B"),
    (_mmb(3, "Which shape?", ["circle", "square"], "B", "scene", 3), "I don't know"),
    (_mmb(4, "How many?", ["one", "two", "three"], "C", "count", 4), "There are three of them"),
]


def write_mmbench(root: Path) -> Path:
    import pandas as pd

    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category"]
    cols += ["l2-category", "image"]
    path = root / "MMBench_DEV_EN.tsv"
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([r for r, _ in MMBENCH_ROWS], columns=cols).to_csv(path, sep="\t", index=False)
    return path


def mmbench_answers() -> dict[str, str]:
    return {str(r["index"]): ans for r, ans in MMBENCH_ROWS}


def write_predictions(path: Path, answers: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": k, "answer": v}) + "\n" for k, v in answers.items()))
    return path
