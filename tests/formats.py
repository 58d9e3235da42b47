"""Fixture writers: tiny datasets in the exact on-disk formats of the real ones.

Each writer puts a handful of real 16x16-32x32 JPEG/PNG images (made with PIL) and the data file
into `root`, and returns a `Fixture` with the paths and the ground truth it wrote, so tests can
compare reader output against what is on disk. Reused by end-to-end tests:

    from tests.formats import write_karpathy
    fx = write_karpathy(tmp_path)            # fx.path: dataset_coco.json, fx.image_root: dir
    records = read_karpathy(fx.path, fx.image_root, splits=("train",))
    assert len(records) == len(fx.expected["train"])

Rows can be overridden (`rows=`) to write deliberately broken files.
"""

from __future__ import annotations

import base64
import copy
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

UNICODE_CAPTION = "Un café près du pont, 中文标题, with a dog 🐶."

_PALETTE = [
    (220, 40, 40),
    (40, 180, 60),
    (40, 60, 220),
    (230, 200, 40),
    (150, 60, 180),
    (30, 30, 30),
    (240, 240, 240),
    (250, 130, 30),
]


@dataclass
class Fixture:
    """What a writer put on disk.

    `path`: the data file (or dataset directory); `image_root`: where image paths resolve (None
    when images are embedded); `rows`: the raw rows as written; `expected`: ground truth in
    reader terms (documented per writer).
    """

    path: Path
    image_root: Path | None
    rows: list[dict[str, Any]]
    expected: dict[str, Any] = field(default_factory=dict)


def make_image(k: int, size: int = 24) -> Image.Image:
    """A small deterministic RGB image: colour `k` of the palette with a diagonal stripe."""
    img = Image.new("RGB", (size, size), _PALETTE[k % len(_PALETTE)])
    for i in range(size):
        img.putpixel((i, (i + k) % size), (0, 0, 0))
    return img


def image_bytes(k: int, fmt: str = "PNG", size: int = 24) -> bytes:
    """Encoded bytes of `make_image(k)` (PNG by default: lossless, so pixels compare exactly)."""
    buf = io.BytesIO()
    make_image(k, size).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, k: int, size: int = 24) -> Path:
    """Write `make_image(k)` to `path`, format from the suffix (.jpg -> JPEG, .png -> PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    make_image(k, size).save(path, format=fmt)
    return path


def write_corrupt_image(path: Path) -> Path:
    """A file with a JPEG name and header but garbage after it (PIL fails to decode it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0" + b"this is not a jpeg" * 4)
    return path


# --------------------------------------------------------------------------- Karpathy


def karpathy_rows(dataset: str = "coco") -> list[dict[str, Any]]:
    """Default rows: 7 images -- train 2, restval 2, val 2, test 1 -- with 1 to 5 sentences.

    COCO rows have `filepath` (train2014/val2014) and `cocoid`; Flickr30k rows have neither
    (ids fall back to `imgid`). One caption is `UNICODE_CAPTION`; one has surrounding spaces.
    """
    captions = [
        ["A man riding a red bike down the street.", "a person on a bicycle", "A cyclist."],
        [UNICODE_CAPTION, "  Two cats sleeping on a couch.  "],
        ["A blue car parked next to a tree.", "a car by a tree", "blue car", "parked car", "x y"],
        ["Three dogs playing in a field."],
        ["A woman holding an umbrella.", "lady with umbrella"],
        ["A clock on top of a building.", "a tower with a clock"],
        ["A pizza on a white plate.", "pizza"],
    ]
    splits = ["train", "train", "restval", "restval", "val", "val", "test"]
    rows = []
    for imgid, (caps, split) in enumerate(zip(captions, splits)):
        sentences = [
            {
                "tokens": c.lower().strip(" .").split(),
                "raw": c,
                "imgid": imgid,
                "sentid": 10 * imgid + j,
            }
            for j, c in enumerate(caps)
        ]
        if dataset == "coco":
            cocoid = 391000 + imgid
            folder = "val2014" if split in ("val", "test", "restval") else "train2014"
            row = {
                "filepath": folder,
                "sentids": [s["sentid"] for s in sentences],
                "filename": f"COCO_{folder}_{cocoid:012d}.jpg",
                "imgid": imgid,
                "split": split,
                "sentences": sentences,
                "cocoid": cocoid,
            }
        else:
            row = {
                "sentids": [s["sentid"] for s in sentences],
                "imgid": imgid,
                "sentences": sentences,
                "split": split,
                "filename": f"{1000092795 + imgid}.jpg",
            }
        rows.append(row)
    return rows


def write_karpathy(
    root: str | Path,
    dataset: str = "coco",
    rows: list[dict[str, Any]] | None = None,
    missing_images: tuple[int, ...] = (),
    corrupt_images: tuple[int, ...] = (),
) -> Fixture:
    """Write `dataset_<dataset>.json` + JPEGs under `root/images` (Karpathy split format).

    `missing_images` / `corrupt_images`: row indices whose image is not written / is garbage.
    `expected`: {split (restval folded into train): {image_id: [stripped raw captions]}},
    plus "restval_ids" (ids whose Karpathy split is restval).
    """
    root = Path(root)
    rows = copy.deepcopy(karpathy_rows(dataset) if rows is None else rows)
    image_root = root / "images"
    image_root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, Any] = {"train": {}, "val": {}, "test": {}, "restval_ids": []}
    for i, row in enumerate(rows):
        fname = row.get("filename")
        if isinstance(fname, str) and i not in missing_images:
            path = image_root / row.get("filepath", "") / fname
            if i in corrupt_images:
                write_corrupt_image(path)
            else:
                write_image(path, i)
        try:
            image_id = str(row.get("cocoid", row["imgid"]))
            split = "train" if row["split"] == "restval" else row["split"]
            expected[split][image_id] = [s["raw"].strip() for s in row["sentences"]]
            if row["split"] == "restval":
                expected["restval_ids"].append(image_id)
        except (KeyError, TypeError, AttributeError):
            pass  # deliberately broken rows have no ground truth
    path = root / f"dataset_{'flickr30k' if dataset == 'flickr30k' else dataset}.json"
    path.write_text(json.dumps({"images": rows, "dataset": dataset}, ensure_ascii=False), "utf-8")
    return Fixture(path, image_root, rows, expected)


# --------------------------------------------------------------------------- NoCaps


def nocaps_data() -> dict[str, Any]:
    """Default NoCaps-val-style content: 6 images (2 per domain), 1-3 captions each."""
    domains = ["in-domain", "in-domain", "near-domain", "near-domain", "out-domain", "out-domain"]
    captions = [
        ["A dog on a beach.", "a brown dog runs on sand"],
        ["Two men playing frisbee.", "people in a park"],
        ["A red fire hydrant.", UNICODE_CAPTION, "hydrant on a street"],
        ["A jellyfish in blue water."],
        ["An accordion on a table.", "a musical instrument"],
        ["A lynx in the snow.", "  wild cat  "],
    ]
    images, annotations = [], []
    for i, (dom, caps) in enumerate(zip(domains, captions)):
        oid = f"{i:04x}ea2087020901"
        images.append(
            {
                "id": i,
                "file_name": f"{oid}.jpg",
                "domain": dom,
                "open_images_id": oid,
                "coco_url": f"https://s3.amazonaws.com/nocaps/val/{oid}.jpg",
                "height": 24,
                "width": 24,
                "date_captured": "2018-11-06 11:04:33",
                "license": 0,
            }
        )
        for c in caps:
            annotations.append({"image_id": i, "id": len(annotations), "caption": c})
    return {
        "licenses": [{"url": "http://creativecommons.org/licenses/by/2.0/", "id": 0}],
        "info": {"url": "http://nocaps.org", "year": 2018, "version": "0.1"},
        "images": images,
        "annotations": annotations,
    }


def write_nocaps(
    root: str | Path,
    data: dict[str, Any] | None = None,
    with_annotations: bool = True,
    missing_images: tuple[int, ...] = (),
) -> Fixture:
    """Write `nocaps_val_4500_captions.json` + JPEGs under `root/nocaps_images`.

    `with_annotations=False` writes the test-split shape (no "annotations" key).
    `rows` = the image entries; `expected`: {"refs": {image_id: [captions]},
    "domains": {image_id: domain}}.
    """
    root = Path(root)
    data = copy.deepcopy(nocaps_data() if data is None else data)
    if not with_annotations:
        data.pop("annotations", None)
    image_root = root / "nocaps_images"
    image_root.mkdir(parents=True, exist_ok=True)
    refs: dict[str, list[str]] = {}
    domains: dict[str, str] = {}
    for i, img in enumerate(data["images"]):
        if i not in missing_images and isinstance(img.get("file_name"), str):
            write_image(image_root / img["file_name"], i)
        refs[str(img.get("id"))] = []
        domains[str(img.get("id"))] = img.get("domain")
    for ann in data.get("annotations", []):
        if str(ann.get("image_id")) in refs and isinstance(ann.get("caption"), str):
            refs[str(ann["image_id"])].append(ann["caption"].strip())
    name = "nocaps_val_4500_captions.json" if with_annotations else "nocaps_test_image_info.json"
    path = root / name
    path.write_text(json.dumps(data, ensure_ascii=False), "utf-8")
    return Fixture(path, image_root, data["images"], {"refs": refs, "domains": domains})


# --------------------------------------------------------------------------- TRL pairs

_TRL_TEXTS = [
    ("Describe the image.", "A red square with a black stripe.", "A green circle."),
    ("What colour is the background?", "Green.", "Blue."),
    ("Caption this picture.", UNICODE_CAPTION, "Une voiture bleue."),
    ("Is there a stripe?", "Yes, one diagonal black stripe.", "No."),
]


def trl_expected() -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) text of the default TRL rows, in order."""
    return list(_TRL_TEXTS)


def conversational(prompt: str, chosen: str, rejected: str) -> dict[str, Any]:
    """TRL conversational (RLAIF-V style) prompt/chosen/rejected for one row."""
    return {
        "prompt": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        ],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def write_trl_jsonl(
    root: str | Path,
    conversational_format: bool = False,
    rows: list[dict[str, Any]] | None = None,
    name: str = "pairs.jsonl",
) -> Fixture:
    """Write a TRL-style JSONL of 4 rows + PNGs under `root/trl_images` (paths relative to it).

    Plain rows: `{"images": ["img_0.png"], "prompt": str, "chosen": str, "rejected": str}`;
    conversational rows use message lists (RLAIF-V style). `expected["texts"]` is
    `trl_expected()`, `expected["images"]` the absolute image paths.
    """
    root = Path(root)
    image_root = root / "trl_images"
    image_root.mkdir(parents=True, exist_ok=True)
    paths = [write_image(image_root / f"img_{k}.png", k) for k in range(len(_TRL_TEXTS))]
    if rows is None:
        rows = []
        for k, (p, c, r) in enumerate(_TRL_TEXTS):
            texts = (
                conversational(p, c, r)
                if conversational_format
                else {"prompt": p, "chosen": c, "rejected": r}
            )
            rows.append({"images": [f"img_{k}.png"], **texts})
    path = root / name
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Fixture(path, image_root, rows, {"texts": trl_expected(), "images": paths})


def write_trl_hf_dataset(
    root: str | Path,
    conversational_format: bool = True,
    split: str | None = "train",
    name: str = "pairs_hf",
) -> Fixture:
    """`datasets.Dataset.from_dict` with an `images` list-of-Image column, `save_to_disk`.

    `split` given: saved as a DatasetDict with that split (how `load_dataset(...)` data is usually
    saved); None: a plain Dataset. Images are embedded as PNG bytes (the Image feature).
    `expected["texts"]` as in `write_trl_jsonl`; `expected["pixels"]`: first pixel per row.
    """
    import datasets

    root = Path(root)
    cols: dict[str, list[Any]] = {"images": [], "prompt": [], "chosen": [], "rejected": []}
    for k, (p, c, r) in enumerate(_TRL_TEXTS):
        texts = (
            conversational(p, c, r)
            if conversational_format
            else {"prompt": p, "chosen": c, "rejected": r}
        )
        if conversational_format:  # Arrow needs one type per column: all-parts content
            texts["rejected"] = [{"role": "assistant", "content": [{"type": "text", "text": r}]}]
        cols["images"].append([make_image(k)])
        for key in ("prompt", "chosen", "rejected"):
            cols[key].append(texts[key])
    ds = datasets.Dataset.from_dict(cols)
    out = datasets.DatasetDict({split: ds}) if split is not None else ds
    path = root / name
    out.save_to_disk(str(path))
    pixels = [make_image(k).getpixel((5, 0)) for k in range(len(_TRL_TEXTS))]
    return Fixture(path, None, [], {"texts": trl_expected(), "pixels": pixels})


def _trl_parquet_table(k0: int, k1: int, layout: str) -> Any:
    """Rows k0..k1-1 of the default TRL texts as an Arrow table in `layout`'s columns."""
    import pyarrow as pa

    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows: list[dict[str, Any]] = []
    for k in range(k0, k1):
        p, c, r = _TRL_TEXTS[k]
        img = {"bytes": image_bytes(k), "path": f"img_{k}.png"}
        if layout == "trl":  # trl-lib/rlaif-v: images list + conversational texts
            conv = conversational(p, c, r)
            conv["rejected"] = [{"role": "assistant", "content": [{"type": "text", "text": r}]}]
            rows.append({"images": [img], **conv})
        else:  # openbmb/RLAIF-V-Dataset: one image struct, `question`, plain strings
            rows.append(
                {"ds_name": "fixture", "image": img, "question": p, "chosen": c, "rejected": r,
                 "origin_dataset": "shapes", "origin_split": '{"model": "x"}',
                 "idx": f"rlaifv-{k}", "image_path": f"imgs/{k}.jpg"}
            )  # fmt: skip
    if layout == "trl":
        part = pa.struct([("text", pa.string()), ("type", pa.string())])
        msgs = pa.list_(pa.struct([("content", pa.list_(part)), ("role", pa.string())]))
        schema = pa.schema(
            [("images", pa.list_(img_t)), ("prompt", msgs), ("chosen", msgs), ("rejected", msgs)]
        )
        return pa.Table.from_pylist(rows, schema=schema)
    return pa.Table.from_pylist(rows, schema=pa.schema(
        [("ds_name", pa.string()), ("image", img_t)]
        + [(c, pa.string()) for c in ("question", "chosen", "rejected", "origin_dataset")]
        + [(c, pa.string()) for c in ("origin_split", "idx", "image_path")]
    ))  # fmt: skip


def write_trl_parquet(root: str | Path, layout: str = "trl", shards: int = 2) -> Fixture:
    """The default TRL rows as parquet shards, images embedded as `{"bytes", "path"}` structs.

    `layout="trl"`: trl-lib/rlaif-v's hub layout `root/data/train-0000k-of-0000n.parquet`
    (columns `images`, conversational `prompt`/`chosen`/`rejected`) plus one
    `data/test-00000-of-00001.parquet` holding row 0 again. `layout="rlaif_v"`:
    openbmb/RLAIF-V-Dataset's `root/RLAIF-V-Dataset_00k.parquet` (columns `ds_name`, `image`,
    `question`, `chosen`, `rejected`, `origin_dataset`, `origin_split`, `idx`, `image_path`).
    `path` is `root`; `expected`: "texts", "files" (the shards in order), "pixels" (per row).
    """
    import pyarrow.parquet as pq

    root = Path(root)
    n = len(_TRL_TEXTS)
    cuts = [round(j * n / shards) for j in range(shards + 1)]
    files = []
    for j in range(shards):
        name = (
            f"data/train-{j:05d}-of-{shards:05d}.parquet"
            if layout == "trl"
            else f"RLAIF-V-Dataset_{j:03d}.parquet"
        )
        files.append(root / name)
        files[-1].parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_trl_parquet_table(cuts[j], cuts[j + 1], layout), files[-1])
    if layout == "trl":
        pq.write_table(_trl_parquet_table(0, 1, layout), root / "data/test-00000-of-00001.parquet")
    pixels = [make_image(k).getpixel((5, 0)) for k in range(n)]
    return Fixture(root, None, [], {"texts": trl_expected(), "files": files, "pixels": pixels})


# --------------------------------------------------------------------------- images


def write_exif_jpeg(path: Path, orientation: int) -> Path:
    """A 32x20 JPEG with four flat-colour quadrants (no symmetry, so every EXIF orientation 1-8
    gives different pixels) and the EXIF Orientation tag set to `orientation`."""
    img = Image.new("RGB", (32, 20), (220, 40, 40))
    img.paste((40, 180, 60), (16, 0, 32, 10))
    img.paste((40, 60, 220), (0, 10, 16, 20))
    img.paste((240, 240, 240), (16, 10, 32, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation  # ExifTags.Base.Orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=95, exif=exif)
    return path


def grey16(value: int, size: tuple[int, int] = (8, 6), mode: str = "I;16") -> Image.Image:
    """A flat 16-bit greyscale image (`value` in 0..65535) in PIL mode I;16, I;16B or I."""
    import numpy as np

    a = np.full(size[::-1], value, dtype=np.uint16)
    if mode == "I":
        return Image.fromarray(a.astype(np.int32))
    return Image.frombytes(mode, size, a.astype(">u2" if mode == "I;16B" else "<u2").tobytes())


def png16_rgb_bytes(rgb: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> bytes:
    """A flat 16-bit-per-channel RGB PNG (colour type 2, bit depth 16), written by hand: PIL
    reads such files but cannot write them."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    w, h = size
    row = b"\x00" + struct.pack(">3H", *rgb) * w  # filter type 0 + pixels
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(row * h))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- MMBench

MMBENCH_COLUMNS = [
    "index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
    "l2-category", "split",
]  # fmt: skip


def mmbench_rows() -> list[dict[str, Any]]:
    """Default MMBench rows (VLMEvalKit column order, `image` is base64 PNG):

    index 0: 4 options, hint; index 1: only A and B, no hint; index 2: 3 options;
    index 1000000: circular copy of 0 whose `image` cell references index 0 (as MMBench does).
    """
    return [
        {
            "index": 0,
            "question": "What colour is the square?",
            "hint": "Look at the background.",
            "A": "red",
            "B": "green",
            "C": "blue",
            "D": "None",
            "answer": "A",
            "category": "attribute_recognition",
            "image": base64.b64encode(image_bytes(0)).decode(),
            "source": "MMBench",
            "l2-category": "finegrained_perception (instance-level)",
            "split": "dev",
        },
        {
            "index": 1,
            "question": "Is there a stripe?",
            "hint": "",
            "A": "yes",
            "B": "no",
            "C": "",
            "D": "",
            "answer": "A",
            "category": "image_scene",
            "image": base64.b64encode(image_bytes(1)).decode(),
            "source": "MMBench",
            "l2-category": "coarse_perception",
            "split": "dev",
        },
        {
            "index": 2,
            "question": "Café 中文 question 🐶?",
            "hint": "",
            "A": "one",
            "B": "two",
            "C": "three",
            "D": "",
            "answer": "C",
            "category": "image_quality",
            "image": base64.b64encode(image_bytes(2)).decode(),
            "source": "MMBench",
            "l2-category": "coarse_perception",
            "split": "dev",
        },
        {
            "index": 1000000,
            "question": "What colour is the square?",
            "hint": "Look at the background.",
            "A": "green",
            "B": "blue",
            "C": "None",
            "D": "red",
            "answer": "D",
            "category": "attribute_recognition",
            "image": "0",
            "source": "MMBench",
            "l2-category": "finegrained_perception (instance-level)",
            "split": "dev",
        },
    ]


def write_mmbench_tsv(
    root: str | Path, rows: list[dict[str, Any]] | None = None, name: str = "MMBench_DEV_EN.tsv"
) -> Fixture:
    """Write an MMBench TSV with pandas (as VLMEvalKit does; empty cells for absent options).

    `expected`: {index (str): {"options": {letter: text}, "answer", "hint", "image_index"}}
    where `image_index` is the palette index of the image (`make_image(k)`).
    """
    import pandas as pd

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = copy.deepcopy(mmbench_rows() if rows is None else rows)
    expected = {}
    for r in rows:
        opts = {k: r[k] for k in "ABCD" if k in r and r[k] not in ("", None)}
        img = int(r["image"]) if str(r.get("image", "")).isdigit() else int(r["index"])
        expected[str(r["index"])] = {
            "options": opts,
            "answer": r.get("answer"),
            "hint": r.get("hint", ""),
            "image_index": img,
        }
    cols = [c for c in MMBENCH_COLUMNS if any(c in r for r in rows)]
    path = root / name
    pd.DataFrame(rows, columns=cols).to_csv(path, sep="\t", index=False)
    return Fixture(path, None, rows, expected)


# --------------------------------------------------------------------------- MMMU


def mmmu_rows() -> list[dict[str, Any]]:
    """Default MMMU validation rows (HF parquet schema), images as {"bytes", "path"} structs:

    0: 4 options, 1 image; 1: 2 options, image_1 empty but image_2 and image_3 set (first
    non-null is image_2, palette 2); 2: open-ended (options "[]"), skipped by the reader;
    3: options containing quotes and an `<image 1>` placeholder in the question.
    """

    def img(k: int) -> dict[str, Any]:
        return {"bytes": image_bytes(k), "path": f"image_{k}.png"}

    base = {f"image_{k}": None for k in range(1, 8)}
    return [
        {
            **base,
            "id": "validation_Art_1",
            "question": "<image 1> Which colour dominates?",
            "options": "['red', 'green', 'blue', 'black']",
            "explanation": "",
            "image_1": img(0),
            "img_type": "['Paintings']",
            "answer": "A",
            "topic_difficulty": "Easy",
            "question_type": "multiple-choice",
            "subfield": "Fine Arts",
        },
        {
            **base,
            "id": "validation_Art_2",
            "question": "Compare <image 2> and <image 3>.",
            "options": "['same', 'different']",
            "explanation": "",
            "image_2": img(2),
            "image_3": img(3),
            "img_type": "['Photographs']",
            "answer": "B",
            "topic_difficulty": "Medium",
            "question_type": "multiple-choice",
            "subfield": "Photography",
        },
        {
            **base,
            "id": "validation_Math_3",
            "question": "How many stripes in <image 1>?",
            "options": "[]",
            "explanation": "",
            "image_1": img(4),
            "img_type": "['Diagrams']",
            "answer": "1",
            "topic_difficulty": "Hard",
            "question_type": "open",
            "subfield": "Geometry",
        },
        {
            **base,
            "id": "validation_Math_4",
            "question": "In <image 1>, what is x?",
            "options": """["it's 2", 'x = "3"', '$\\\\frac{1}{2}$']""",
            "explanation": "",
            "image_1": img(5),
            "img_type": "['Diagrams']",
            "answer": "C",
            "topic_difficulty": "Hard",
            "question_type": "multiple-choice",
            "subfield": "Algebra",
        },
    ]


def write_mmmu_parquet(
    root: str | Path,
    rows: list[dict[str, Any]] | None = None,
    subject: str = "Art",
    name: str = "validation-00000-of-00001.parquet",
) -> Fixture:
    """Write MMMU rows as `root/<subject>/<name>` (the HF repo layout), images as structs.

    `path` is the parquet file, `image_root` is `root` (pass it to read a whole directory).
    `expected`: {id: {"options": [...], "answer", "num_images", "first_image"}} for
    multiple-choice rows, and "open_ended": [ids].
    """
    import ast

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    rows = copy.deepcopy(mmmu_rows() if rows is None else rows)
    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    str_cols = ["id", "question", "options", "explanation", "img_type", "answer"]
    str_cols += ["topic_difficulty", "question_type", "subfield"]
    schema = pa.schema(
        [(c, pa.string()) for c in str_cols[:4]]
        + [(f"image_{k}", img_t) for k in range(1, 8)]
        + [(c, pa.string()) for c in str_cols[4:]]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    path = root / subject / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    expected: dict[str, Any] = {"open_ended": []}
    for r in rows:
        try:
            opts = ast.literal_eval(r["options"])
        except (ValueError, SyntaxError, TypeError):
            continue
        if not opts:
            expected["open_ended"].append(r["id"])
            continue
        imgs = [k for k in range(1, 8) if r.get(f"image_{k}")]
        expected[r["id"]] = {
            "options": opts,
            "answer": r["answer"],
            "num_images": len(imgs),
            "first_image": r[f"image_{imgs[0]}"]["bytes"] if imgs else None,
        }
    return Fixture(path, root, rows, expected)
