"""Multiple-choice benchmarks: MMBench (TSV, base64 images) and MMMU (parquet) -> `MCQuestion`.

Both are read in their released formats (VLMEvalKit TSV for MMBench, the HF parquet shards
for MMMU) so scores are comparable with published numbers. Images are kept encoded
(`ImageRef(data=...)`) and decoded only when asked for.
"""

from __future__ import annotations

import ast
import base64
import binascii
import logging
import re
import string
from dataclasses import replace
from pathlib import Path
from typing import Any

from cwdpo.data.reading import Stats, bump, report_skipped, require_path
from cwdpo.data.records import DataError, ImageRef, MCQuestion

log = logging.getLogger(__name__)

LETTERS = string.ascii_uppercase
MMBENCH_REQUIRED = ("index", "question", "A", "B", "image")
MMMU_REQUIRED = ("id", "question", "options", "answer")
CIRCULAR_OFFSET = 1_000_000
IMAGE_PLACEHOLDER = re.compile(
    r"<image (\d+)>"
)  # MMBench stores circular copies of question q at q + k * 1e6


def _blank(v: Any) -> bool:
    """Empty cell: None, NaN, "" or the string "nan" (how pandas round-trips a missing option)."""
    if v is None:
        return True
    if isinstance(v, float):
        return v != v
    return isinstance(v, str) and v.strip().lower() in ("", "nan")


def _check_options(options: dict[str, str], where: str, field: str) -> None:
    keys = list(options)
    if keys != list(LETTERS[: len(keys)]):
        raise DataError(
            f"{where}: field {field!r}: expected contiguous options A, B, ..., got {keys}"
        )


def _check_answer(answer: str, options: dict[str, str], where: str) -> None:
    if answer not in options:
        raise DataError(
            f"{where}: field 'answer': expected one of the option letters {list(options)}, "
            f"got {answer!r}"
        )


def _read_tsv(tsv_path: str | Path) -> tuple[Path, Any]:
    """The TSV as a string-typed DataFrame with the required columns."""
    import pandas as pd

    path = require_path(tsv_path, "MMBench TSV", directory=False)
    try:
        # dtype=str + keep_default_na=False: an option literally "None" or "NA" stays text.
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception as e:
        raise DataError(f"{path}: cannot parse as TSV: {e}") from e
    missing = [c for c in MMBENCH_REQUIRED if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    return path, df


def _mmbench_image(row: dict[str, Any], qid: str, where: str, by_index: dict) -> bytes:
    """The decoded image bytes; a short cell holding another row's index reuses its image."""
    img_cell = str(row["image"]).strip()
    if len(img_cell) <= 64 and img_cell in by_index and img_cell != qid:
        img_cell = str(by_index[img_cell]["image"]).strip()
    if _blank(img_cell):
        raise DataError(f"{where}: field 'image': expected a base64-encoded image, got ''")
    try:
        return base64.b64decode(img_cell, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DataError(f"{where}: field 'image': expected base64-encoded image bytes: {e}") from e


def _mmbench_question(
    row: dict[str, Any], i: int, path: Path, letters: list[str], has_answer: bool, by_index: dict
) -> MCQuestion:
    """Row `i` as a question: index, options (at least A and B), answer, image, meta."""
    qid = str(row["index"]).strip()
    where = f"{path}: row {i} (index={qid})"
    if not qid:
        raise DataError(f"{where}: field 'index': expected a question index, got ''")
    options = {k: str(row[k]).strip() for k in letters if not _blank(row[k])}
    _check_options(options, where, "A..")
    if len(options) < 2:
        raise DataError(f"{where}: field 'A'/'B': expected at least two options, got {options}")
    answer = str(row["answer"]).strip() if has_answer else ""
    if has_answer:
        _check_answer(answer, options, where)
    data = _mmbench_image(row, qid, where, by_index)
    meta: dict[str, Any] = {"index": qid}
    for k in ("l2-category", "source", "split"):
        if k in row and not _blank(row[k]):
            meta[k] = str(row[k])
    if qid.isdigit():
        meta["circular_group"] = str(int(qid) % CIRCULAR_OFFSET)
    return MCQuestion(
        qid=qid,
        image=ImageRef(data=data, name=f"{path}: index {qid}"),
        question=str(row["question"]).strip(),
        options=options,
        answer=answer,
        category="" if _blank(row.get("category")) else str(row["category"]),
        hint="" if _blank(row.get("hint")) else str(row["hint"]).strip(),
        meta=meta,
    )


def read_mmbench(tsv_path: str | Path, *, stats: Stats | None = None) -> list[MCQuestion]:
    """Read an MMBench TSV (`index, question, hint, A, B, C, D, answer, category, l2-category,
    image`) into `MCQuestion`s.

    Options with empty/NaN cells are absent (some questions have only A and B). `image` is
    base64; as in VLMEvalKit, a short `image` cell holding another row's `index` reuses that
    row's image (how MMBench stores circular copies). A file without an `answer` column (test
    split) gives `answer=""`. `meta` keeps `index`, `l2-category` and the circular group id.
    """
    path, df = _read_tsv(tsv_path)
    letters = [c for c in LETTERS if c in df.columns]
    has_answer = "answer" in df.columns
    rows = df.to_dict("records")
    by_index = {str(r["index"]).strip(): r for r in rows}
    out = [
        _mmbench_question(row, i, path, letters, has_answer, by_index) for i, row in enumerate(rows)
    ]
    if not out:
        raise DataError(f"{path}: no questions")
    bump(stats, "records", len(out))
    return out


def circular_variants(q: MCQuestion) -> list[MCQuestion]:
    """MMBench CircularEval: the question with its options rotated k = 0..N-1 places.

    Variant k puts old option (j + k) mod N at letter j, and moves the answer with it; a model
    is credited for the question only if it answers every variant correctly. Variant 0 is `q`
    itself (same qid); others get `qid@c<k>`, and all share `meta["circular_group"]`.
    """
    keys = list(q.options)
    n = len(keys)
    group = q.meta.get("circular_group", q.qid)
    out = []
    for k in range(n):
        options = {keys[j]: q.options[keys[(j + k) % n]] for j in range(n)}
        answer = keys[(keys.index(q.answer) - k) % n] if q.answer in q.options else q.answer
        meta = {**q.meta, "circular_group": group, "circular_shift": k}
        qid = q.qid if k == 0 else f"{q.qid}@c{k}"
        out.append(replace(q, qid=qid, options=options, answer=answer, meta=meta))
    return out


def _parquet_files(path: Path, split: str | None) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.rglob("*.parquet"))
    if split is not None:  # HF layout: <Subject>/<split>-00000-of-00001.parquet
        files = [f for f in files if f.name.startswith(f"{split}-")]
    if not files:
        where = f" for split {split!r}" if split is not None else ""
        raise DataError(f"{path}: no .parquet files found{where}")
    return files


def _image_cell(v: Any) -> bytes | None:
    if v is None or (isinstance(v, float) and v != v):
        return None
    if isinstance(v, dict):
        b = v.get("bytes")
        return bytes(b) if b is not None else None
    if isinstance(v, bytes | bytearray):
        return bytes(v)
    return None


def _parquet_rows(f: Path) -> list[dict[str, Any]]:
    """The rows of one shard, which must have the MMMU columns."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(f).to_pylist()
    except Exception as e:
        raise DataError(f"{f}: cannot read parquet: {e}") from e
    if rows:
        missing = [c for c in MMMU_REQUIRED if c not in rows[0]]
        if missing:
            raise DataError(f"{f}: missing column(s) {missing}; found {list(rows[0])}")
    return rows


def _mmmu_options(raw: Any, where: str) -> list[str]:
    """The option texts of an `options` cell (a string holding a Python list); [] = open-ended."""
    try:
        opts = ast.literal_eval(raw) if isinstance(raw, str) else raw
    except (ValueError, SyntaxError) as e:
        raise DataError(
            f"{where}: field 'options': expected a string holding a Python list, got {raw!r:.80}"
        ) from e
    if not isinstance(opts, list | tuple) or not all(isinstance(o, str) for o in opts):
        raise DataError(f"{where}: field 'options': expected a list of strings, got {raw!r:.80}")
    if len(opts) > len(LETTERS):
        raise DataError(f"{where}: field 'options': at most {len(LETTERS)} options supported")
    return list(opts)


def _mmmu_images(
    row: dict[str, Any], f: Path, qid: str, where: str, opts: list[str]
) -> tuple[list[ImageRef], list[int]]:
    """The non-null `image_1..image_7` and their numbers; every `<image k>` placeholder in the
    question or an option must point at one of them."""
    images, numbers = [], []
    for k in range(1, 8):
        data = _image_cell(row.get(f"image_{k}"))
        if data is not None:
            images.append(ImageRef(data=data, name=f"{f}: id {qid} image_{k}"))
            numbers.append(k)
    for field, text in (
        ("question", str(row["question"])),
        *((f"options[{j}]", o) for j, o in enumerate(opts)),
    ):
        for k in IMAGE_PLACEHOLDER.findall(text):
            if int(k) not in numbers:
                raise DataError(
                    f"{where}: field {field!r} refers to <image {k}> but column image_{k} "
                    f"is empty (images present: {[f'image_{n}' for n in numbers]})"
                )
    return images, numbers


def _mmmu_question(row: dict[str, Any], i: int, f: Path) -> MCQuestion | None:
    """Row `i` of shard `f` as a question, or None for an open-ended row (no options)."""
    qid = str(row["id"])
    where = f"{f}: row {i} (id={qid})"
    opts = _mmmu_options(row["options"], where)
    if not opts:
        return None
    options = {LETTERS[k]: o.strip() for k, o in enumerate(opts)}
    answer = str(row["answer"]).strip()
    _check_answer(answer, options, where)
    images, numbers = _mmmu_images(row, f, qid, where, opts)
    meta: dict[str, Any] = {"num_images": len(images), "images": images, "image_numbers": numbers}
    for k in ("subfield", "question_type", "img_type", "topic_difficulty"):
        if row.get(k) is not None:
            meta[k] = row[k]
    return MCQuestion(
        qid=qid,
        image=images[0] if images else None,
        question=str(row["question"]),
        options=options,
        answer=answer,
        category=str(row.get("subfield") or ""),
        meta=meta,
    )


def read_mmmu(
    parquet_path_or_dir: str | Path, *, split: str | None = None, stats: Stats | None = None
) -> list[MCQuestion]:
    """Read MMMU parquet shard(s) (a file, or a directory searched recursively) into
    `MCQuestion`s. For a directory, `split` (e.g. "validation") keeps only `<split>-*.parquet`
    shards, the layout of the HF MMMU repo (whose dev/validation/test shards sit side by side).

    `options` is a string holding a Python list, mapped to letters A, B, ...; `<image k>`
    placeholders stay in the question (and options). The first non-null `image_1..image_7` is
    the question's image; `meta["images"]` keeps every `ImageRef` (all are fed to the model,
    each where its placeholder stands), `meta["image_numbers"]` their column numbers k and
    `meta["num_images"]` their count. A placeholder to an empty image column raises `DataError`.
    Open-ended rows (empty options) are skipped, logged and counted in
    `stats["skipped_open_ended"]`. An answer that is not an option letter raises `DataError`.
    """
    root = require_path(parquet_path_or_dir, "MMMU parquet file or directory")
    out: list[MCQuestion] = []
    open_ended = 0
    for f in _parquet_files(root, split):
        for i, row in enumerate(_parquet_rows(f)):
            q = _mmmu_question(row, i, f)
            if q is None:
                open_ended += 1
            else:
                out.append(q)
    report_skipped(
        stats, "skipped_open_ended", open_ended, root, "open-ended questions (no options)"
    )
    if not out:
        raise DataError(f"{root}: no multiple-choice questions")
    bump(stats, "records", len(out))
    return out
