"""Readers against fixtures written in the real formats (tests/formats.py)."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from cwdpo.data.karpathy import read_karpathy
from cwdpo.data.multiple_choice import circular_variants, read_mmbench, read_mmmu
from cwdpo.data.nocaps import read_nocaps
from cwdpo.data.records import DataError, MCQuestion
from cwdpo.data.trl_pairs import read_preference_pairs
from tests.formats import (
    UNICODE_CAPTION,
    conversational,
    karpathy_rows,
    make_image,
    mmbench_rows,
    mmmu_rows,
    nocaps_data,
    write_karpathy,
    write_mmbench_tsv,
    write_mmmu_parquet,
    write_nocaps,
    write_trl_hf_dataset,
    write_trl_jsonl,
)

# ------------------------------------------------------------------------------------ Karpathy


def test_karpathy_coco_splits_ids_and_references(tmp_path):
    fx = write_karpathy(tmp_path, "coco")
    recs = read_karpathy(fx.path, fx.image_root, splits=("train", "val", "test"))
    by_split = {s: {r.image_id: r.references for r in recs if r.split == s} for s in fx.expected}
    assert by_split["train"] == fx.expected["train"]  # restval folded in: 2 + 2
    assert len(by_split["train"]) == 4
    assert by_split["val"] == fx.expected["val"] and len(by_split["val"]) == 2
    assert by_split["test"] == fx.expected["test"] and len(by_split["test"]) == 1
    assert all(r.image_id.startswith("391") for r in recs)  # cocoid, not imgid
    restval = [r for r in recs if r.meta.get("karpathy_split") == "restval"]
    assert sorted(r.image_id for r in restval) == sorted(fx.expected["restval_ids"])
    assert max(len(r.references) for r in recs) == 5
    two_cats = next(r for r in recs if "Two cats sleeping on a couch." in r.references)
    assert UNICODE_CAPTION in two_cats.references  # unicode round-trip, whitespace stripped
    img = recs[0].image.load()
    assert img.mode == "RGB" and img.size == (24, 24)
    assert "train2014" in recs[0].image.path


def test_karpathy_restval_unfolded_and_flickr_imgid(tmp_path):
    fx = write_karpathy(tmp_path, "coco")
    recs = read_karpathy(fx.path, fx.image_root, splits=("train", "restval"), fold_restval=False)
    assert sorted(r.split for r in recs) == ["restval", "restval", "train", "train"]
    fl = write_karpathy(tmp_path / "f30k", "flickr30k")
    assert fl.path.name == "dataset_flickr30k.json"
    recs = read_karpathy(fl.path, fl.image_root, splits=("val",))
    assert [r.image_id for r in recs] == ["4", "5"]  # imgid when there is no cocoid
    assert recs[0].image.path == str(fl.image_root / "1000092799.jpg")


def _bad_karpathy(tmp_path, mutate):
    rows = karpathy_rows("coco")
    mutate(rows)
    return write_karpathy(tmp_path, "coco", rows=rows)


@pytest.mark.parametrize(
    "field, mutate",
    [
        ("filename", lambda rows: rows[1].pop("filename")),
        ("sentences", lambda rows: rows[1].pop("sentences")),
        ("sentences", lambda rows: rows[1].__setitem__("sentences", [])),
        ("split", lambda rows: rows[1].__setitem__("split", "dev")),
        ("raw", lambda rows: rows[1]["sentences"][1].__setitem__("raw", "   ")),
    ],
)
def test_karpathy_bad_rows(tmp_path, field, mutate):
    fx = _bad_karpathy(tmp_path, mutate)
    with pytest.raises(DataError) as e:
        read_karpathy(fx.path, fx.image_root, splits=("train",))
    msg = str(e.value)
    assert fx.path.name in msg and field in msg and "images[1]" in msg and "expected" in msg


def test_karpathy_bad_root_and_splits(tmp_path):
    fx = write_karpathy(tmp_path, "coco")
    with pytest.raises(DataError, match="nope"):
        read_karpathy(fx.path, tmp_path / "nope")
    with pytest.raises(DataError, match="dataset_missing.json"):
        read_karpathy(tmp_path / "dataset_missing.json", fx.image_root)
    with pytest.raises(DataError, match="restval"):
        read_karpathy(fx.path, fx.image_root, splits=("restval",))
    rows = [r for r in karpathy_rows("coco") if r["split"] != "test"]
    fx2 = write_karpathy(tmp_path / "notest", "coco", rows=rows)
    with pytest.raises(DataError, match="'test' has no rows"):
        read_karpathy(fx2.path, fx2.image_root, splits=("test",))


def test_karpathy_missing_and_corrupt_images(tmp_path, caplog):
    fx = write_karpathy(tmp_path, "coco", missing_images=(0, 2), corrupt_images=(1,))
    with pytest.raises(DataError) as e:
        read_karpathy(fx.path, fx.image_root)
    assert "COCO_train2014_000000391000.jpg" in str(e.value) and fx.path.name in str(e.value)
    stats: dict[str, int] = {}
    with caplog.at_level(logging.WARNING):
        recs = read_karpathy(fx.path, fx.image_root, skip_bad_images=True, stats=stats)
    assert stats == {"skipped_missing_image": 2, "records": 2}
    assert "skipped 2" in caplog.text
    corrupt = next(r for r in recs if r.image_id == "391001")
    with pytest.raises(DataError, match="COCO_train2014_000000391001.jpg"):
        corrupt.image.load()


# ------------------------------------------------------------------------------------ NoCaps


def test_nocaps_domains_and_references(tmp_path):
    fx = write_nocaps(tmp_path)
    recs = read_nocaps(fx.path, fx.image_root)
    assert len(recs) == 6
    assert {r.image_id: r.references for r in recs} == fx.expected["refs"]
    assert {r.image_id: r.meta["domain"] for r in recs} == fx.expected["domains"]
    assert all(r.split == "val" for r in recs)
    assert any(UNICODE_CAPTION in r.references for r in recs)
    assert "wild cat" in recs[5].references  # stripped
    near = read_nocaps(fx.path, fx.image_root, domains=["near-domain"], split="validation")
    assert [r.meta["domain"] for r in near] == ["near-domain"] * 2
    assert near[0].split == "validation" and near[0].image.load().size == (24, 24)
    with pytest.raises(DataError, match="far-domain"):
        read_nocaps(fx.path, fx.image_root, domains=["far-domain"])


def test_nocaps_test_split_without_references(tmp_path):
    fx = write_nocaps(tmp_path, with_annotations=False)
    with pytest.raises(DataError, match="annotations"):
        read_nocaps(fx.path, fx.image_root, split="test")
    recs = read_nocaps(fx.path, fx.image_root, split="test", allow_no_references=True)
    assert len(recs) == 6 and all(r.references == [] for r in recs)


@pytest.mark.parametrize(
    "field, mutate",
    [
        ("image_id", lambda d: d["annotations"].append({"image_id": 99, "id": 9, "caption": "x"})),
        ("caption", lambda d: d["annotations"][0].__setitem__("caption", " ")),
        ("domain", lambda d: d["images"][1].__setitem__("domain", "in_domain")),
        ("file_name", lambda d: d["images"][1].pop("file_name")),
        (
            "annotations",
            lambda d: d.__setitem__("annotations", [a for a in d["annotations"] if a["image_id"]]),
        ),
    ],
)
def test_nocaps_bad_rows(tmp_path, field, mutate):
    data = nocaps_data()
    mutate(data)
    fx = write_nocaps(tmp_path, data=data)
    with pytest.raises(DataError) as e:
        read_nocaps(fx.path, fx.image_root)
    assert fx.path.name in str(e.value) and field in str(e.value)


def test_nocaps_missing_image(tmp_path):
    fx = write_nocaps(tmp_path, missing_images=(3,))
    with pytest.raises(DataError, match="0003ea2087020901.jpg"):
        read_nocaps(fx.path, fx.image_root)
    stats: dict[str, int] = {}
    assert len(read_nocaps(fx.path, fx.image_root, skip_bad_images=True, stats=stats)) == 5
    assert stats["skipped_missing_image"] == 1


# ------------------------------------------------------------------------------------ TRL pairs


def _texts(recs):
    return [(r.prompt, r.chosen, r.rejected) for r in recs]


def test_trl_jsonl_plain_and_conversational_agree(tmp_path):
    plain = write_trl_jsonl(tmp_path / "plain", conversational_format=False)
    conv = write_trl_jsonl(tmp_path / "conv", conversational_format=True)
    a = read_preference_pairs(plain.path, plain.image_root)
    b = read_preference_pairs(conv.path, conv.image_root)
    assert _texts(a) == _texts(b) == plain.expected["texts"]
    assert all(r.source == "trl" for r in a + b)
    assert a[0].image.path == str(plain.expected["images"][0])
    assert a[2].image.load().getpixel((5, 0)) == make_image(2).getpixel((5, 0))
    assert b[0].meta["prompt_messages"][0]["role"] == "user" and "prompt_messages" not in a[0].meta
    assert a[0].image_id == "img_0.png"


def test_trl_hf_dataset_dir(tmp_path):
    fx = write_trl_hf_dataset(tmp_path, conversational_format=True, split="train")
    recs = read_preference_pairs(fx.path)
    assert _texts(recs) == fx.expected["texts"]
    assert [r.image.load().getpixel((5, 0)) for r in recs] == fx.expected["pixels"]
    assert recs[0].image.data is not None  # kept encoded, decoded lazily
    assert recs[1].image_id == "pairs_hf:1"
    with pytest.raises(DataError, match="no split 'test'"):
        read_preference_pairs(fx.path, split="test")
    flat = write_trl_hf_dataset(tmp_path, conversational_format=False, split=None, name="flat")
    assert _texts(read_preference_pairs(flat.path)) == fx.expected["texts"]


def test_trl_in_memory_dataset_with_pil_images(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"image": [make_image(3)], "prompt": ["p"], "chosen": ["yes"], "rejected": ["no"]}
    )
    (rec,) = read_preference_pairs(ds)
    assert rec.image.load().getpixel((5, 0)) == make_image(3).getpixel((5, 0))


def test_trl_single_image_column_and_multi_images(tmp_path):
    fx = write_trl_jsonl(tmp_path)
    rows = [
        {
            "image": {"path": "img_1.png", "bytes": None},
            "prompt": "p",
            "chosen": "a",
            "rejected": "b",
        },
        {"images": ["img_0.png", "img_3.png"], "prompt": "p", "chosen": "a", "rejected": "b"},
    ]
    fx2 = write_trl_jsonl(tmp_path, rows=rows, name="other.jsonl")
    stats: dict[str, int] = {}
    r0, r1 = read_preference_pairs(fx2.path, fx.image_root, stats=stats)
    assert r0.image.path.endswith("img_1.png")
    assert r1.meta["num_images"] == 2 and r1.meta["images"][1].path.endswith("img_3.png")
    assert stats["multi_image_rows"] == 1
    # without image_root, relative paths resolve next to the data file
    row = {"images": ["trl_images/img_2.png"], "prompt": "p", "chosen": "a", "rejected": "b"}
    (r,) = read_preference_pairs(write_trl_jsonl(tmp_path, rows=[row], name="rel.jsonl").path)
    assert r.image.path == str(tmp_path / "trl_images" / "img_2.png")


def test_trl_invalid_json_line(tmp_path):
    fx = write_trl_jsonl(tmp_path, rows=[_row()], name="broken.jsonl")
    with fx.path.open("a", encoding="utf-8") as f:
        f.write("\n{not json\n")
    with pytest.raises(DataError, match=r"broken.jsonl: line 3 \(row 1\): invalid JSON"):
        read_preference_pairs(fx.path, fx.image_root)


def _row(**kw):
    row = {"images": ["img_0.png"], "prompt": "Describe.", "chosen": "a dog", "rejected": "a cat"}
    row.update(kw)
    return row


@pytest.mark.parametrize(
    "field, row",
    [
        ("rejected", _row(rejected="a dog")),
        ("rejected", _row(**conversational("Describe.", "a dog", "a dog"))),
        ("chosen", _row(chosen="  ")),
        ("rejected", _row(rejected=[{"role": "assistant", "content": []}])),
        ("prompt", {k: v for k, v in _row().items() if k != "prompt"}),
        ("images", {k: v for k, v in _row().items() if k != "images"}),
        ("images", _row(images=[])),
        ("chosen", _row(chosen=42)),
    ],
)
def test_trl_bad_rows(tmp_path, field, row):
    fx = write_trl_jsonl(tmp_path, rows=[_row(), row])
    with pytest.raises(DataError) as e:
        read_preference_pairs(fx.path, fx.image_root)
    msg = str(e.value)
    assert fx.path.name in msg and "row 1" in msg and field in msg


def test_trl_missing_image_file(tmp_path, caplog):
    fx = write_trl_jsonl(tmp_path, rows=[_row(), _row(images=["gone.png"])])
    with pytest.raises(DataError, match="gone.png"):
        read_preference_pairs(fx.path, fx.image_root)
    stats: dict[str, int] = {}
    with caplog.at_level(logging.WARNING):
        recs = read_preference_pairs(fx.path, fx.image_root, skip_bad_images=True, stats=stats)
    assert len(recs) == 1 and stats["skipped_missing_image"] == 1 and "skipped 1" in caplog.text


def test_trl_hf_dataset_missing_column(tmp_path):
    import datasets

    path = tmp_path / "nocol"
    datasets.Dataset.from_dict(
        {"images": [[make_image(0)]], "prompt": ["p"], "chosen": ["a"]}
    ).save_to_disk(str(path))
    with pytest.raises(DataError, match="rejected") as e:
        read_preference_pairs(path)
    assert "nocol" in str(e.value)


# ------------------------------------------------------------------------------------ MMBench


def test_mmbench_reads_options_hint_and_shared_images(tmp_path):
    fx = write_mmbench_tsv(tmp_path)
    qs = read_mmbench(fx.path)
    assert [q.qid for q in qs] == ["0", "1", "2", "1000000"]
    for q in qs:
        exp = fx.expected[q.qid]
        assert q.options == exp["options"] and q.answer == exp["answer"] and q.hint == exp["hint"]
        px = make_image(exp["image_index"]).getpixel((5, 0))
        assert q.image is not None and q.image.load().getpixel((5, 0)) == px
    assert list(qs[1].options) == ["A", "B"]  # only two options
    assert qs[0].options["D"] == "None"  # literal text "None" is an option, not a missing cell
    assert qs[2].question == "Café 中文 question 🐶?"
    assert qs[0].meta["l2-category"].startswith("finegrained") and qs[0].meta["index"] == "0"
    assert qs[0].meta["circular_group"] == qs[3].meta["circular_group"] == "0"
    assert qs[0].category == "attribute_recognition"


def test_mmbench_circular_variants():
    q = MCQuestion("7", None, "q?", {"A": "a", "B": "b", "C": "c", "D": "d"}, "B")
    vs = circular_variants(q)
    assert [v.qid for v in vs] == ["7", "7@c1", "7@c2", "7@c3"]
    assert vs[0].options == q.options and vs[0].answer == "B"
    assert vs[1].options == {"A": "b", "B": "c", "C": "d", "D": "a"} and vs[1].answer == "A"
    for v in vs:
        assert v.options[v.answer] == "b"  # the correct text moves with the answer
        assert sorted(v.options.values()) == ["a", "b", "c", "d"]
        assert v.meta["circular_group"] == "7"
    assert {v.answer for v in vs} == {"A", "B", "C", "D"}
    two = circular_variants(MCQuestion("8", None, "q?", {"A": "yes", "B": "no"}, "A"))
    assert [(v.options, v.answer) for v in two] == [
        ({"A": "yes", "B": "no"}, "A"),
        ({"A": "no", "B": "yes"}, "B"),
    ]


@pytest.mark.parametrize(
    "field, mutate",
    [
        ("answer", lambda rows: rows[1].__setitem__("answer", "C")),  # only A, B exist
        ("image", lambda rows: rows[1].__setitem__("image", "not base64 !!")),
        ("A..", lambda rows: rows[0].__setitem__("B", "")),  # A, C, D: a hole
    ],
)
def test_mmbench_bad_rows(tmp_path, field, mutate):
    rows = mmbench_rows()
    mutate(rows)
    fx = write_mmbench_tsv(tmp_path, rows=rows)
    with pytest.raises(DataError) as e:
        read_mmbench(fx.path)
    assert fx.path.name in str(e.value) and field in str(e.value) and "row" in str(e.value)


def test_mmbench_test_split_without_answers(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "answer"} for r in mmbench_rows()]
    qs = read_mmbench(write_mmbench_tsv(tmp_path, rows=rows).path)
    assert all(q.answer == "" for q in qs)


# ------------------------------------------------------------------------------------ MMMU


def test_mmmu_options_images_and_open_ended(tmp_path, caplog):
    fx = write_mmmu_parquet(tmp_path)
    stats: dict[str, int] = {}
    with caplog.at_level(logging.WARNING):
        qs = read_mmmu(fx.path, stats=stats)
    assert stats == {"skipped_open_ended": 1, "records": 3}
    assert "skipped 1 open-ended" in caplog.text
    assert [q.qid for q in qs] == ["validation_Art_1", "validation_Art_2", "validation_Math_4"]
    for q in qs:
        exp = fx.expected[q.qid]
        assert list(q.options.values()) == exp["options"] and q.answer == exp["answer"]
        assert q.meta["num_images"] == exp["num_images"]
        assert q.image is not None and q.image.data == exp["first_image"]
    assert list(qs[0].options) == ["A", "B", "C", "D"] and list(qs[1].options) == ["A", "B"]
    assert qs[2].options == {"A": "it's 2", "B": 'x = "3"', "C": "$\\frac{1}{2}$"}
    assert qs[0].question.startswith("<image 1>") and qs[0].category == "Fine Arts"
    assert qs[1].image.load().getpixel((5, 0)) == make_image(2).getpixel((5, 0))


def test_mmmu_directory(tmp_path):
    write_mmmu_parquet(tmp_path, subject="Art")
    rows = copy.deepcopy(mmmu_rows()[:1])
    rows[0]["id"] = "validation_Biology_1"
    write_mmmu_parquet(tmp_path, rows=rows, subject="Biology")
    qs = read_mmmu(tmp_path)
    assert len(qs) == 4 and qs[-1].qid == "validation_Biology_1"
    write_mmmu_parquet(tmp_path, rows=rows, subject="Biology", name="dev-00000-of-00001.parquet")
    assert len(read_mmmu(tmp_path, split="validation")) == 4
    assert [q.qid for q in read_mmmu(tmp_path, split="dev")] == ["validation_Biology_1"]
    with pytest.raises(DataError, match="split 'test'"):
        read_mmmu(tmp_path, split="test")


@pytest.mark.parametrize(
    "field, change",
    [
        ("answer", {"answer": "E"}),
        ("options", {"options": "['a', 'b'"}),
        ("options", {"options": "3"}),
    ],
)
def test_mmmu_bad_rows(tmp_path, field, change):
    rows = mmmu_rows()
    rows[0].update(change)
    fx = write_mmmu_parquet(tmp_path, rows=rows)
    with pytest.raises(DataError) as e:
        read_mmmu(fx.path)
    assert (
        fx.path.name in str(e.value)
        and field in str(e.value)
        and "validation_Art_1" in str(e.value)
    )


def test_fixture_files_are_the_real_shapes(tmp_path):
    """Guards the writers that other tests reuse: top-level keys as in the released files."""
    k = json.loads(write_karpathy(tmp_path / "k").path.read_text("utf-8"))
    assert set(k) == {"images", "dataset"} and {"filename", "imgid", "split", "sentences"} <= set(
        k["images"][0]
    )
    n = json.loads(write_nocaps(tmp_path / "n").path.read_text("utf-8"))
    assert {"images", "annotations"} <= set(n) and {"id", "file_name", "domain"} <= set(
        n["images"][0]
    )
