"""`VLMBackbone.collate_pairs` processes each pair's image(s) + prompt once (issue 26) and still
returns exactly the 2n rows the processor gives for the doubled row list: the reference here is
`collate` on (images × 2, prompts × 2, chosen + rejected), i.e. the processor run on every row,
which is what `collate_pairs` did before. Equal batches, key by key and bit for bit, give every
consumer (plain and shared-prefix log-probs, the reference cache, the stages) the same numbers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from PIL import Image

from cwdpo.batch import IGNORE_INDEX
from cwdpo.errors import DataError, OverBudget
from cwdpo.model.backbone import VLMBackbone
from cwdpo.model.families import FAMILIES, ensure_family


@pytest.fixture(scope="module")
def rows():
    """Three ShapesWorld pairs with different prompt and response lengths."""
    from cwdpo.data.shapes import ShapesWorld

    ps = ShapesWorld().pairs("train", 3)
    prompts = [ps[0].prompt, "What is in the picture?", "Describe the shapes, left to right."]
    return [p.image.load() for p in ps], prompts, [p.chosen for p in ps], [p.rejected for p in ps]


@contextmanager
def counting_processor(bb: VLMBackbone) -> Iterator[dict[str, int]]:
    """Counts calls of the backbone's processor and the images they are handed."""
    cls = type(bb.processor)
    real = cls.__call__
    seen = {"calls": 0, "images": 0}

    def call(self: Any, *args: Any, **kw: Any) -> Any:
        seen["calls"] += 1
        seen["images"] += sum(len(ims) for ims in kw.get("images") or [])
        return real(self, *args, **kw)

    cls.__call__ = call
    try:
        yield seen
    finally:
        cls.__call__ = real


def assert_same_batch(got: dict[str, Any], want: dict[str, Any], name: str) -> None:
    assert list(got) == list(want), name
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), f"{name} {k}"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_processes_each_pair_once_and_gets_the_doubled_rows_batch(
    name, rows, tiny_cache_dir
):
    """One processor call, one image per single-image pair (two for the two-image pair), and
    the batch equals the processor's on the doubled rows: Qwen's packed patches +
    image_grid_thw, Idefics3/SmolVLM's pixel_attention_mask, LLaVA-NeXT/OneVision's
    image_sizes / batch_num_images, Gemma3/PaliGemma's token_type_ids."""
    images, prompts, chosen, rejected = rows
    if FAMILIES[name].multi_image:
        images = [images[0], [images[1], images[2]], images[2]]
    n_images = sum(len(im) if isinstance(im, list) else 1 for im in images)
    torch.manual_seed(0)
    bb = VLMBackbone.from_pretrained(ensure_family(name, tiny_cache_dir), max_length=384)
    with counting_processor(bb) as seen:
        got = bb.collate_pairs(images, prompts, chosen, rejected)
    assert seen == {"calls": 1, "images": n_images}, name  # was 2 calls' worth: 2·n_images
    with counting_processor(bb) as seen:
        want = bb.collate(list(images) * 2, list(prompts) * 2, list(chosen) + list(rejected))
    assert seen["images"] == 2 * n_images
    assert_same_batch(got, want, name)


def test_tiny_llava_collated_keys_literal(backbone):
    """The docstring example of `collate_pairs`, key by key."""
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (48, 32), "blue")
    b = backbone.collate_pairs(
        [red, blue],
        ["Describe.", "Colour?"],
        ["a red square", "blue"],
        ["a blue circle", "a green circle"],
    )
    assert list(b) == ["input_ids", "attention_mask", "labels", "pixel_values"]
    assert all(b[k].shape == (4, 77) and b[k].dtype == torch.long for k in list(b)[:3])
    # <|user|>, then 64 image tokens: the same prompt head on every row
    assert torch.equal(b["input_ids"][:, :65], torch.tensor([[5] + [4] * 64] * 4))
    tail = torch.tensor(
        [
            [440, 21, 3, 6, 72, 337, 291, 3, 0, 0, 0, 0],  # "Describe." + "a red square" <|end|>
            [42, 86, 83, 86, 318, 38, 3, 6, 485, 3, 0, 0],  # "Colour?" + "blue" <|end|>
            [440, 21, 3, 6, 72, 322, 300, 3, 0, 0, 0, 0],  # "Describe." + "a blue circle"
            [42, 86, 83, 86, 318, 38, 3, 6, 72, 335, 300, 3],  # "Colour?" + "a green circle"
        ]
    )
    assert torch.equal(b["input_ids"][:, 65:], tail)
    real = (tail != 0).long()
    assert torch.equal(
        b["attention_mask"], torch.cat([torch.ones(4, 65, dtype=torch.long), real], 1)
    )
    I = IGNORE_INDEX  # noqa: E741
    labels = torch.tensor(
        [
            [I, I, I, I, 72, 337, 291, 3, I, I, I, I],
            [I, I, I, I, I, I, I, I, 485, 3, I, I],
            [I, I, I, I, 72, 322, 300, 3, I, I, I, I],
            [I, I, I, I, I, I, I, I, 72, 335, 300, 3],
        ]
    )
    assert torch.equal(b["labels"], torch.cat([torch.full((4, 65), I), labels], 1))
    assert [backbone.tokenizer.decode(t) for t in ([72, 337, 291], [485], [72, 335, 300])] == [
        "a red square",
        "blue",
        "a green circle",
    ]
    # CLIP preprocessing with mean = std = 0.5: a red image is (1, -1, -1) on every pixel
    rgb = {"red": [1.0, -1.0, -1.0], "blue": [-1.0, -1.0, 1.0]}
    want = torch.tensor([rgb[c] for c in ("red", "blue", "red", "blue")])
    assert torch.equal(b["pixel_values"], want[:, :, None, None].expand(4, 3, 32, 32))


def test_token_budget_errors_still_name_rows_and_pairs(backbone, rows):
    """The truncation policy sees the 2n rows as before: errors name the batch row (rejected
    rows n..2n-1), drop_pair names the pair."""
    images, prompts, chosen, _ = rows
    long = "a big red circle " * 40
    rejected = ["a green square", long, "a blue circle"]
    with pytest.raises(DataError, match=r"batch row 4 .*model.max_length=128"):
        backbone.collate_pairs(images, prompts, chosen, rejected)
    backbone.truncation = "drop_pair"
    with pytest.raises(OverBudget) as e:
        backbone.collate_pairs(images, prompts, chosen, rejected)
    assert e.value.rows == [1]
    with pytest.raises(ValueError, match="same length: 3, 2, 3, 3"):
        backbone.collate_pairs(images, prompts[:2], chosen, rejected)
