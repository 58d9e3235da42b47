"""CHAIR on COCO: hand-written COCO annotation files, descriptions scored by hand."""

from __future__ import annotations

import json
import re
from fnmatch import fnmatch
from pathlib import Path

import pytest

from cwdpo.errors import DataError
from cwdpo.metrics.benchmarks.chair import SYNONYMS_FILE, ChairBenchmark, CocoObjects
from cwdpo.metrics.benchmarks.words import singularize
from tests.bench_formats import CHAIR_ANSWERS as ANSWERS
from tests.bench_formats import write_coco

ROOT = Path(__file__).resolve().parent.parent
# the 80 COCO detection categories (instances_val2014.json "categories", in id order)
COCO_80 = [
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
]


def test_chair_scores_the_fixture_as_computed_by_hand(tmp_path):
    bench = ChairBenchmark(**write_coco(tmp_path), n_images=0)
    items = bench.read()
    assert [it.id for it in items] == ["1", "2", "3", "4"]
    gt = {it.id: it.meta["gt_objects"] for it in items}
    # instance boxes + every object the reference captions name ("couch", "bed")
    assert gt == {
        "1": ["couch", "dog", "person"],
        "2": ["dining table", "hot dog"],
        "3": ["bed", "teddy bear"],
        "4": [],
    }
    assert items[0].prompt == "Please describe this image in detail."
    assert items[0].images[0].load().size == (24, 24)
    got = bench.score(items, ANSWERS)
    # mentions 3 + 2 + 2 + 0 = 7, hallucinated: cat, bird = 2 in 2 of 4 descriptions;
    # GT 3 + 2 + 2 + 0 = 7, covered 3 + 1 + 1 = 5; words 10 + 9 + 9 + 6 = 34
    assert got == pytest.approx(
        {
            "chair/chair_s": 50.0,
            "chair/chair_i": 100 * 2 / 7,
            "chair/recall": 100 * 5 / 7,
            "chair/length": 34 / 4,
        }
    )
    with pytest.raises(DataError, match=r"no answer for 1 of 4 item\(s\), e.g. id '4'"):
        bench.score(items, {k: v for k, v in ANSWERS.items() if k != "4"})


def test_repeated_mentions_each_count_and_no_mentions_scores_zero(tmp_path):
    bench = ChairBenchmark(**write_coco(tmp_path), image_ids=[2, 4])
    items = bench.read()
    got = bench.score(items, {"2": "A cat, a cat and a hot dog.", "4": "Nothing here."})
    # 3 mentions (cat twice), 2 hallucinated; both descriptions: 1 of 2 hallucinates
    assert got["chair/chair_i"] == pytest.approx(100 * 2 / 3)
    assert got["chair/chair_s"] == 50.0 and got["chair/recall"] == 50.0
    nothing = bench.score(items, {"2": "Hmm.", "4": ""})
    assert nothing == {
        "chair/chair_s": 0.0,
        "chair/chair_i": 0.0,
        "chair/recall": 0.0,
        "chair/length": 0.5,
    }


def test_mention_rules_match_the_reference():
    objs = CocoObjects()
    m = objs.mentions
    assert m("Two hot dogs and teddy bears.") == [
        ("hot dog", "hot dog"),
        ("teddy bear", "teddy bear"),
    ]
    assert m("A baby elephant and an adult bird.") == [("elephant", "elephant"), ("bird", "bird")]
    assert m("A baby in a crib.") == [("baby", "person")]
    assert m("A passenger train.") == [("train", "train")]
    assert m("The seat of the toilet.") == [("toilet", "toilet")]  # no chair
    assert m("A toilet seat.") == [("toilet", "toilet")]
    assert m("A man wearing a bow tie.") == [("man", "person"), ("tie", "tie")]
    # cleaned table: entries the reference's leading space kept from matching
    assert m("A motor bike and cheesecake on my iPhone.") == [
        ("motor bike", "motorcycle"),
        ("cheesecake", "cake"),
        ("iphone", "cell phone"),
    ]
    assert m("Train tracks.") == []  # "train track" is not a train (OPERA's rule)
    assert m("Hot, dog.") == [("dog", "dog")]  # punctuation breaks a two-word object
    assert m("Knives, mice, geese, women and children.") == [
        ("knife", "knife"),
        ("mouse", "mouse"),
        ("goose", "bird"),
        ("woman", "person"),
        ("child", "person"),
    ]
    assert m("A pair of scissors and two wine glasses and skis.") == [
        ("scissors", "scissors"),
        ("wine glass", "wine glass"),
        ("skis", "skis"),
    ]


def test_where_the_offline_singularizer_differs_from_wordnet_with_pos_tags():
    """OPERA's CHAIR lemmatizes with POS tags: the verbs "tied" → "tie" and "skiing" → "ski"
    fire the COCO objects tie and skis. The reference CHAIR (pattern.en singularize) and this
    one leave verbs alone, so they do not."""
    objs = CocoObjects()
    assert objs.mentions("A dog tied to a bench while a woman is skiing.") == [
        ("dog", "dog"),
        ("bench", "bench"),
        ("woman", "person"),
    ]
    assert singularize("tied") == "tied" and singularize("skiing") == "skiing"
    # nouns: the forms the object words take
    for plural, singular in [("puppies", "puppy"), ("ponies", "pony"), ("ties", "tie"), ("buses", "bus"),
                             ("benches", "bench"), ("boxes", "box"), ("glasses", "glass"), ("canoes", "canoe"),
                             ("policemen", "policeman"), ("horses", "horse"), ("vases", "vase"), ("doggies", "doggie"),
                             ("sandwiches", "sandwich"), ("tennis", "tennis"), ("bus", "bus")]:  # fmt: skip
        assert singularize(plural) == singular, plural


def test_synonym_table_is_package_data_with_the_80_categories():
    objs = CocoObjects()
    names = COCO_80
    assert len(names) == 80 and len(set(names)) == 80
    assert set(objs.category.values()) == set(names)
    assert all(objs.category[n] == n for n in names)
    # pyproject ships the table with the package (a wheel without it would fail at import time)
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = pyproject["tool"]["setuptools"]["package-data"]["cwdpo.metrics.benchmarks"]
    assert any(fnmatch(SYNONYMS_FILE.name, pattern) for pattern in package_data)


def test_image_choice_is_seeded(tmp_path):
    paths = write_coco(tmp_path)
    a = [it.id for it in ChairBenchmark(**paths, n_images=2, seed=1).read()]
    b = [it.id for it in ChairBenchmark(**paths, n_images=2, seed=1).read()]
    assert a == b and len(a) == 2 and set(a) <= {"1", "2", "3", "4"}
    assert [it.id for it in ChairBenchmark(**paths, image_ids=[3, 1]).read()] == ["3", "1"]
    varied = ChairBenchmark(**paths, n_images=0, prompt=["Describe it.", "Tell me all you see."])
    assert [it.prompt for it in varied.read()] == ["Describe it.", "Tell me all you see."] * 2
    with pytest.raises(DataError, match="image_ids lists an image twice"):
        ChairBenchmark(**paths, image_ids=[3, 3]).read()
    with pytest.raises(ValueError, match="prompt must be a non-empty text"):
        ChairBenchmark(**paths, prompt=[])
    with pytest.raises(DataError, match=r"image id 7 .*not in .*instances_val2014.json"):
        ChairBenchmark(**paths, image_ids=[7]).read()


def test_read_errors_name_file_row_and_field(tmp_path):
    paths = write_coco(tmp_path)
    inst = json.loads(Path(paths["instances"]).read_text())
    inst["annotations"][1].pop("category_id")
    Path(paths["instances"]).write_text(json.dumps(inst))
    with pytest.raises(
        DataError,
        match=re.escape(
            "instances_val2014.json: annotations[1]: field 'category_id' is None; expected int"
        ),
    ):
        ChairBenchmark(**paths).read()
    inst["annotations"][1]["category_id"] = 5
    Path(paths["instances"]).write_text(json.dumps(inst))
    with pytest.raises(
        DataError, match=re.escape("annotations[1]: category_id 5 is not in 'categories'")
    ):
        ChairBenchmark(**paths).read()
    paths = write_coco(tmp_path)
    caps = json.loads(Path(paths["captions"]).read_text())
    caps["annotations"][2]["caption"] = 3
    Path(paths["captions"]).write_text(json.dumps(caps))
    with pytest.raises(
        DataError,
        match=re.escape(
            "captions_val2014.json: annotations[2]: field 'caption' is 3; expected str"
        ),
    ):
        ChairBenchmark(**paths).read()
    paths = write_coco(tmp_path)
    Path(paths["captions"]).write_text(json.dumps({"images": []}))
    with pytest.raises(
        DataError, match=r"captions_val2014.json: expected a top-level 'annotations' list"
    ):
        ChairBenchmark(**paths).read()
    paths = write_coco(tmp_path)
    (Path(paths["images_dir"]) / "COCO_val2014_000000000003.jpg").unlink()
    with pytest.raises(
        DataError, match=r"image file of image id 3 not found: .*COCO_val2014_000000000003.jpg"
    ):
        ChairBenchmark(**paths).read()
    with pytest.raises(DataError, match=r"annotation file not found: .*nope.json"):
        ChairBenchmark(
            instances=str(tmp_path / "nope.json"), captions=paths["captions"], images_dir="."
        ).read()
    inst = json.loads(Path(paths["instances"]).read_text())
    inst["categories"].append({"id": 500, "name": "unicorn"})
    Path(paths["instances"]).write_text(json.dumps(inst))
    with pytest.raises(
        DataError, match=r"categories\[5\]: category 'unicorn' is not in the synonym table"
    ):
        ChairBenchmark(**paths).read()


def test_release_layout_under_path(tmp_path):
    paths = write_coco(tmp_path)
    (tmp_path / "annotations").mkdir()
    for key in ("instances", "captions"):
        Path(paths[key]).rename(tmp_path / "annotations" / Path(paths[key]).name)
    bench = ChairBenchmark(path=str(tmp_path), n_images=0)
    assert bench.score(bench.read(), ANSWERS)["chair/chair_s"] == 50.0
    with pytest.raises(ValueError, match=r"chair: give instances= \(a file\) or path="):
        ChairBenchmark(captions="c.json", images_dir=".")
