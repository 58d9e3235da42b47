"""CHAIR on COCO (Rohrbach et al. 2018), asked Object HalBench style: a detailed description.

Ground truth per image = the COCO categories of its instance annotations plus every category its
five reference captions mention (the reference's two sources). A generated description's object
mentions are found as the reference scorer finds them: lowercase tokens, each singularized
(`words.singularize`, rule-based and offline — see there for where it differs from the WordNet
lemmatizer), adjacent two-word objects merged ("hot dog", "teddy bear", "motor bike"), qualifiers
that would fire "person" folded into the animal or vehicle ("baby bird" → bird, "passenger
train" → train), "toilet seat" → toilet, then mapped to their category through the 80-category
synonym table (`coco_synonyms.txt`, shipped with the package). Every mention counts, repeats
included (the reference's CHAIR_i).

Metrics (percent, as papers print them): CHAIR_s = descriptions with ≥ 1 hallucinated mention,
CHAIR_i = hallucinated mentions / all mentions, recall = ground-truth categories mentioned / all
ground-truth categories (OPERA's addition), and the mean length in words (punctuation not
counted; OPERA's `Len` counts punctuation tokens too).

Where this deliberately differs from the reference table: synonym entries are stripped and
lowercased, so "motor bike", "cheesecake" and "iphone" match (the reference's entries carry a
leading space / capital and never do); "train track" is merged (OPERA's addition) so it does not
fire "train".
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from cwdpo.data.records import ImageRef
from cwdpo.errors import DataError
from cwdpo.metrics.benchmarks.base import BenchItem, Benchmark, require_answers
from cwdpo.metrics.benchmarks.layout import local_file, read_json, row_field
from cwdpo.metrics.benchmarks.words import is_word, singularize, tokenize

SYNONYMS_FILE = Path(__file__).with_name("coco_synonyms.txt")
DEFAULT_PROMPT = "Please describe this image in detail."
_INSTANCES = "annotations/instances_val2014.json"
_CAPTIONS = "annotations/captions_val2014.json"

#: two-token objects that are one word for matching (the reference's list + "train track")
_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate", "train track",
)  # fmt: skip
#: "baby X" / "adult X" is the animal X, not a person ("baby", "adult" are person synonyms)
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra")
_ANIMALS_MORE = ("giraffe", "animal", "cub")
#: "passenger X" is the vehicle X, not a person
_VEHICLES = ("jet", "train")


def load_synonyms(path: str | Path = SYNONYMS_FILE) -> dict[str, str]:
    """{word or two-word phrase: its COCO category} from a synonym table (category first)."""
    table: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        words = [w.strip().lower() for w in line.split(",") if w.strip()]
        for w in words:
            if table.get(w, words[0]) != words[0]:
                raise DataError(
                    f"{path}: line {n}: {w!r} already names category {table[w]!r}, "
                    f"now {words[0]!r}; a word may name one category"
                )
            table[w] = words[0]
    return table


class CocoObjects:
    """Finds the COCO-category mentions of a text, by the reference CHAIR's rules."""

    def __init__(self, synonyms: Mapping[str, str] | None = None) -> None:
        self.category = dict(synonyms if synonyms is not None else load_synonyms())
        self.double = {w: w for w in _DOUBLE_WORDS}
        for animal in _ANIMALS + _ANIMALS_MORE:
            self.double[f"baby {animal}"] = self.double[f"adult {animal}"] = animal
        for vehicle in _VEHICLES:
            self.double[f"passenger {vehicle}"] = vehicle
        self.double.update({"bow tie": "tie", "toilet seat": "toilet"})

    def words(self, text: str) -> list[str]:
        """Lowercased, singularized tokens with the two-word objects merged."""
        tokens = [singularize(t) for t in tokenize(text.lower())]
        merged: list[str] = []
        i = 0
        while i < len(tokens):
            pair = " ".join(tokens[i : i + 2])
            if pair in self.double:
                merged.append(self.double[pair])
                i += 2
            else:
                merged.append(tokens[i])
                i += 1
        if "toilet" in merged and "seat" in merged:  # "the seat of the toilet" is no chair
            merged = [w for w in merged if w != "seat"]
        return merged

    def mentions(self, text: str) -> list[tuple[str, str]]:
        """(word as written after merging, its category) for every object mention, in order."""
        return [(w, self.category[w]) for w in self.words(text) if w in self.category]


def _load(path: str | Path, keys: Sequence[str]) -> dict[str, Any]:
    data = read_json("chair", path, "annotation")
    for key in keys:
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(f"chair: {path}: expected a top-level {key!r} list (COCO format)")
    return data


_field = partial(row_field, "chair")


class ChairBenchmark(Benchmark):
    """CHAIR_s / CHAIR_i / recall / length of detailed descriptions of COCO val images.

    `instances` / `captions`: COCO `instances_val2014.json` / `captions_val2014.json`; images
    under `images_dir/<file_name>`; each defaults to COCO's layout under `path`
    (`annotations/instances_val2014.json`, `annotations/captions_val2014.json`, `val2014/`).
    `image_ids` picks images; else `n_images` (0 = all) drawn with `random.Random(seed)` from
    the instance file's images (OPERA: 500 val2014 images). `synonyms`: another table file in
    `coco_synonyms.txt`'s format.
    `prompt`: one instruction for every image, or a list (Object HalBench asks each image one of
    several detailed-description instructions): image k of the chosen order gets prompt k mod n.
    """

    name = "chair"
    file_keys = ("instances", "captions", "images_dir")

    def __init__(
        self,
        path: str | None = None,
        instances: str | None = None,
        captions: str | None = None,
        images_dir: str | None = None,
        n_images: int = 500,
        seed: int = 0,
        image_ids: Sequence[int] | None = None,
        prompt: str | Sequence[str] = DEFAULT_PROMPT,
        max_new_tokens: int = 512,
        synonyms: str | None = None,
    ) -> None:
        if n_images < 0:
            raise ValueError(f"chair: n_images must be >= 0 (0 = all), got {n_images}")
        self.instances = local_file("chair", "instances", instances, path, _INSTANCES)
        self.captions = local_file("chair", "captions", captions, path, _CAPTIONS)
        self.images_dir = local_file("chair", "images_dir", images_dir, path, "val2014")
        self.n_images, self.seed = n_images, seed
        self.prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ValueError(
                f"chair: prompt must be a non-empty text or list of texts, got {prompt!r}"
            )
        self.image_ids = None if image_ids is None else [int(i) for i in image_ids]
        self.max_new_tokens = max_new_tokens
        self.objects = CocoObjects(load_synonyms(synonyms) if synonyms else None)

    def check(self) -> None:
        for key in self.file_keys:
            if not Path(getattr(self, key)).exists():
                raise DataError(f"chair: {key} not found: {getattr(self, key)}")

    def _choose(self, files: dict[int, str]) -> list[int]:
        if self.image_ids is not None:
            if len(set(self.image_ids)) < len(self.image_ids):
                raise DataError(f"chair: image_ids lists an image twice: {self.image_ids}")
            unknown = [i for i in self.image_ids if i not in files]
            if unknown:
                raise DataError(
                    f"chair: image id {unknown[0]} (of image_ids) is not in {self.instances}"
                )
            return list(self.image_ids)
        ids = sorted(files)
        if self.n_images and self.n_images < len(ids):
            ids = sorted(random.Random(self.seed).sample(ids, self.n_images))
        return ids

    def _ground_truth(self, inst: dict, caps: dict, chosen: set[int]) -> dict[int, set[str]]:
        names = {}
        for i, cat in enumerate(inst["categories"]):
            where = f"{self.instances}: categories[{i}]"
            name = _field(cat, "name", where, str)
            if name.lower() not in self.objects.category:
                raise DataError(f"chair: {where}: category {name!r} is not in the synonym table")
            names[_field(cat, "id", where, int)] = self.objects.category[name.lower()]
        gt: dict[int, set[str]] = {i: set() for i in chosen}
        for i, ann in enumerate(inst["annotations"]):
            where = f"{self.instances}: annotations[{i}]"
            image_id = _field(ann, "image_id", where, int)
            cat_id = _field(ann, "category_id", where, int)
            if cat_id not in names:
                raise DataError(f"chair: {where}: category_id {cat_id} is not in 'categories'")
            if image_id in gt:
                gt[image_id].add(names[cat_id])
        for i, ann in enumerate(caps["annotations"]):
            where = f"{self.captions}: annotations[{i}]"
            image_id = _field(ann, "image_id", where, int)
            if image_id in gt:
                caption = _field(ann, "caption", where, str)
                gt[image_id].update(c for _, c in self.objects.mentions(caption))
        return gt

    def read(self) -> list[BenchItem]:
        inst = _load(self.instances, ("images", "annotations", "categories"))
        caps = _load(self.captions, ("annotations",))
        files = {}
        for i, img in enumerate(inst["images"]):
            where = f"{self.instances}: images[{i}]"
            files[_field(img, "id", where, int)] = _field(img, "file_name", where, str)
        chosen = self._choose(files)
        gt = self._ground_truth(inst, caps, set(chosen))
        items = []
        for k, image_id in enumerate(chosen):
            path = Path(self.images_dir) / files[image_id]
            if not path.is_file():
                raise DataError(f"chair: image file of image id {image_id} not found: {path}")
            items.append(
                BenchItem(
                    id=str(image_id),
                    images=[ImageRef(path=str(path), name=files[image_id])],
                    prompt=self.prompts[k % len(self.prompts)],
                    meta={"gt_objects": sorted(gt[image_id])},
                )
            )
        return items

    def score(self, items: Sequence[BenchItem], answers: Mapping[str, str]) -> dict[str, float]:
        if not items:
            raise ValueError("chair: no items to score")
        texts = require_answers(self.name, items, answers)
        n_mentions = n_hallucinated = n_hallucinated_captions = n_gt = n_covered = n_words = 0
        for item, text in zip(items, texts):
            gt = set(item.meta["gt_objects"])
            found = [c for _, c in self.objects.mentions(text)]
            wrong = [c for c in found if c not in gt]
            n_mentions += len(found)
            n_hallucinated += len(wrong)
            n_hallucinated_captions += bool(wrong)
            n_gt += len(gt)
            n_covered += len(gt & set(found))
            n_words += sum(is_word(t) for t in tokenize(text))
        return {
            "chair/chair_s": 100.0 * n_hallucinated_captions / len(items),
            "chair/chair_i": 100.0 * n_hallucinated / n_mentions if n_mentions else 0.0,
            "chair/recall": 100.0 * n_covered / n_gt if n_gt else 0.0,
            "chair/length": n_words / len(items),
        }
