"""Benchmark fixtures in the official on-disk formats (POPE JSONL + COCO image files, lmms-lab
POPE parquet, MMMU validation parquet, MMBench TSV with base64 images and circular copies, COCO
instances + captions for CHAIR, AMBER's repository files, MMHal-Bench's response template and a
fake OpenAI-compatible rater), each with hand-written answers that exercise the parsing rules.
Expected scores are computed by hand in tests/test_benchmarks.py and tests/test_bench_*.py."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

from tests.fake_openai import FakeChatServer, chat_reply
from tests.formats import image_bytes, write_image
from tests.gloo import LEAVE, free_port, run_ranks

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


# ------------------------------------------------------------------------------- CHAIR (COCO)
CAT_IDS = {"person": 1, "dog": 18, "hot dog": 58, "dining table": 67, "teddy bear": 88}


def write_coco(root: Path, *, instances: dict | None = None, captions: dict | None = None) -> dict:
    """Four val images: (1) dog + person, (2) hot dog + table, (3) teddy bear, (4) nothing."""
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (1, 2, 3, 4)]
    for img in images:
        write_image(root / "val2014" / img["file_name"], img["id"])
    boxes = [
        (1, "dog"),
        (1, "person"),
        (1, "person"),
        (2, "hot dog"),
        (2, "dining table"),
        (3, "teddy bear"),
    ]
    inst = instances or {
        "images": images,
        "annotations": [
            {"id": k, "image_id": i, "category_id": CAT_IDS[c], "bbox": [0, 0, 1, 1]}
            for k, (i, c) in enumerate(boxes)
        ],
        "categories": [{"id": v, "name": k, "supercategory": "x"} for k, v in CAT_IDS.items()],
    }
    caps = captions or {
        "images": images,
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A man and his dog on a couch."},
            {"id": 11, "image_id": 2, "caption": "Hot dogs on a table."},
            {"id": 12, "image_id": 3, "caption": "A teddy bear sits on a bed."},
            {"id": 13, "image_id": 4, "caption": "A view of the sky."},
            {"id": 14, "image_id": 99, "caption": "A giraffe."},  # an image not asked about
        ],
    }
    paths = {
        "instances": root / "instances_val2014.json",
        "captions": root / "captions_val2014.json",
    }
    paths["instances"].write_text(json.dumps(inst))
    paths["captions"].write_text(json.dumps(caps))
    return {
        "instances": str(paths["instances"]),
        "captions": str(paths["captions"]),
        "images_dir": str(root / "val2014"),
    }


CHAIR_ANSWERS = {
    # plural + synonym ("dogs", "sofa" = couch): 3 mentions, none hallucinated, all 3 GT covered
    "1": "Two dogs and a man are sitting on a sofa.",
    # two-word plural object ("hot dogs") + a hallucinated cat
    "2": "Hot dogs on a plate next to a cat.",
    # "baby bird" is a bird (hallucinated), not a person; "teddy bear" is one object
    "3": "A baby bird is perched on a teddy bear.",
    # no objects at all
    "4": "The sky is blue and clear.",
}


# -------------------------------------------------------------------------------------- AMBER
AMBER_RELATION = {
    "dog": ["puppy", "pet"],
    "cat": ["kitten"],
    "grass": ["lawn"],
    "person": ["man", "woman", "child"],
    "car": ["vehicle"],
    "tree": [],
    "bench": [],
    "background": [],
    "animal": ["hound", "kitty"],
    "orange": [],
}
AMBER_GENERATIVE = [  # (id, truth, hallu, response)
    # puppy → dog (Cover), lawn → grass (Cover), cats: hallucinated (Cog cat), background: safe
    (1, ["dog", "grass", "person"], ["cat", "car"],
     "A puppy plays on the lawn with two cats in the background."),
    # "Trees" is capitalized: the official scorer never matches it; bench covered
    (2, ["tree", "bench"], ["person", "dog"], "Trees stand behind an empty bench."),
    # vehicle → car (Cover); man and woman: hallucinated people (Cog person once)
    (3, ["car"], ["person"], "A blue vehicle parked near a man and a woman."),
]  # fmt: skip
AMBER_DISCRIMINATIVE = [  # (id, type, truth, response, read by yes_word, read by exact)
    (1005, "discriminative-hallucination", "yes", "Yes, there is a dog.", "Yes", None),
    (1006, "discriminative-hallucination", "no", "No.", "No", None),
    (1007, "discriminative-attribute-state", "no", "There is no cat.", "No", None),
    (1008, "discriminative-attribute-number", "yes", "No", "No", "No"),
    (1009, "discriminative-relation", "no", "Yes", "Yes", "Yes"),
    (1010, "discriminative-attribute-action", "yes", "I don't know.", "No", None),
    (1011, "discriminative-hallucination", "no", "The eyes are closed.", "No", None),
    (1012, "discriminative-hallucination", "yes", " Yes ", "Yes", "Yes"),
]


def write_amber(root: Path) -> dict:
    ids = [g[0] for g in AMBER_GENERATIVE] + [d[0] for d in AMBER_DISCRIMINATIVE]
    for i in ids:
        write_image(root / "image" / f"AMBER_{i}.jpg", i)
    annotations = [
        {"id": i, "type": "generative", "truth": t, "hallu": h} for i, t, h, _ in AMBER_GENERATIVE
    ]
    annotations += [{"id": i, "type": k, "truth": t} for i, k, t, *_ in AMBER_DISCRIMINATIVE]
    gen_q = [
        {"id": i, "image": f"AMBER_{i}.jpg", "query": "Describe this image."}
        for i, *_ in AMBER_GENERATIVE
    ]
    dis_q = [
        {"id": i, "image": f"AMBER_{i}.jpg", "query": f"Question {i}?"}
        for i, *_ in AMBER_DISCRIMINATIVE
    ]
    files = {
        "annotations": ("annotations.json", annotations),
        "relation": ("relation.json", AMBER_RELATION),
        "gen": ("query_generative.json", gen_q),
        "dis": ("query_discriminative.json", dis_q),
    }
    paths = {}
    for key, (name, data) in files.items():
        paths[key] = str(root / name)
        Path(paths[key]).write_text(json.dumps(data, indent=1))
    (root / "safe_words.txt").write_text("background\nscene\n")
    return {
        "annotations": paths["annotations"],
        "relation": paths["relation"],
        "safe_words": str(root / "safe_words.txt"),
        "images_dir": str(root / "image"),
        "queries": [paths["gen"], paths["dis"]],
    }


AMBER_GEN_ANSWERS = {str(i): r for i, _, _, r in AMBER_GENERATIVE}
AMBER_DIS_ANSWERS = {str(i): r for i, _, _, r, _, _ in AMBER_DISCRIMINATIVE}


# -------------------------------------------------------------------------------- MMHal-Bench
MMHAL_SECRET = "sk-test-MMHAL-123"
# (question_type, model answer, the fake judge's reply, the score it is worth)
MMHAL_ROWS = [
    ("attribute", "GOOD red", "The answer matches.\nRating: 6", 6),
    ("attribute", "OK", "Correct but terse. **Rating:** 4", 4),
    ("counting", "BAD", "It invents a third dog. Rating: 1", 1),
    ("counting", "GARBAGE", "I cannot decide.", 0),  # unparsed: no rating → 0
    ("adversarial", "TWO", "Rating: 2, or maybe Rating: 5", 0),  # unparsed: two ratings → 0
    ("holistic", "SAME", "Rating: 3. Final Rating: 3", 3),  # the same rating twice is one
]


class FakeRatingJudge(FakeChatServer):
    """/v1/chat/completions answering by the model answer shown in the rubric prompt."""

    def __init__(self):
        self.requests: list[dict] = []
        self.fail_with: int | None = None
        self.replies = {answer: reply for _, answer, reply, _ in MMHAL_ROWS}
        super().__init__()

    def reply(self, body, headers, path):
        self.requests.append({"auth": headers.get("Authorization"), "body": body})
        if self.fail_with:
            return self.fail_with, {"error": "down"}
        prompt = body["messages"][-1]["content"]
        answer = re.search(r"^Model's answer: (.*)$", prompt, re.M).group(1)
        return chat_reply(self.replies.get(answer, "Rating: 5"))


def write_mmhal(root: Path) -> dict:
    rows = []
    for i, (kind, *_rest) in enumerate(MMHAL_ROWS):
        name = f"{1000 + i}_abc_o.jpg"
        rows.append(
            {
                "question_type": kind,
                "question_topic": "animal",
                "image_id": f"id{i}",
                "image_src": f"https://c1.staticflickr.com/5/{name}",
                "image_content": ["Dog", "Grass"],
                "question": f"Question {i}: what colour is the dog?",
                "gt_answer": f"Truth {i}",
                "model_answer": "",
            }
        )
        # row 5's image is stored under its image_id (the fallback name)
        file = f"id{i}.jpg" if i == 5 else name
        write_image(root / "images" / file, i)
    path = root / "response_template.json"
    path.write_text(json.dumps(rows, indent=1))
    return {"template": str(path), "images_dir": str(root / "images")}


# ------------------------------------------------------------------------- DDP (gloo) runs
DDP_SCRIPT = (
    """
import json, sys
import torch
import torch.distributed as dist
from cwdpo.metrics.benchmarks.generate import generate_answers, score_answers
from cwdpo.metrics.benchmarks.registry import build_task
from cwdpo.model.backbone import VLMBackbone

rank, world, port, out, model, nodes = sys.argv[1:7]
rank, world = int(rank), int(world)
torch.set_num_threads(1)
if world > 1:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
bb = VLMBackbone.from_pretrained(model, max_length=512)
res = {}
for name, node in json.loads(nodes).items():
    bench = build_task(name, node)
    items = bench.read()
    answers = generate_answers(bb, items, batch_size=2, max_new_tokens=4)
    res[name] = {"answers": answers, "scores": score_answers(bench, items, answers)}
with open(out, "w") as f:
    json.dump(res, f)
"""
    + LEAVE
)


def run_benchmarks(tmp: Path, model: Path, nodes: dict, world: int) -> list[dict]:
    """Each benchmark of `nodes` generated by `world` gloo processes (each rank its shard, the
    answers gathered, rank 0 scoring): every rank's {task: {answers, scores}}."""
    script = tmp / "ddp_benchmarks.py"
    script.write_text(DDP_SCRIPT)
    port = free_port()
    outs = [tmp / f"r{world}_{rank}.json" for rank in range(world)]
    argvs = [
        [str(rank), str(world), port, str(out), str(model), json.dumps(nodes)]
        for rank, out in enumerate(outs)
    ]
    run_ranks(script, argvs)
    return [json.loads(out.read_text()) for out in outs]


def one_step_curve(backbone, tasks: list[str], configs: dict, root: Path) -> list[tuple[str, str]]:
    """The sorted (task, step) points the benchmark callback writes to benchmarks.csv over one
    SFT step of `backbone` on a tiny ShapesWorld (every step, one item per task)."""
    import lightning as L

    from cwdpo.callbacks.benchmarks import BENCH_CSV, BenchmarkCurve
    from cwdpo.utils.run_files import read_csv
    from tests.helpers import cpu_trainer, shapes_sft

    curve = BenchmarkCurve(
        tasks=tasks, configs=configs, every_n_steps=1, n_items=1, stages=["sft_c"]
    )
    L.seed_everything(0)
    module, dm = shapes_sft(
        backbone, {"train": 4, "val": 2, "test": 2, "probe": 2}, 1, batch_size=2
    )
    cpu_trainer(root, 1, [curve]).fit(module, datamodule=dm)
    return sorted({(r["task"], r["step"]) for r in read_csv(root / BENCH_CSV)})
