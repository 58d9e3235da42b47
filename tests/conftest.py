"""Shared fixtures: one tiny VLM per test session, fresh backbones per test, ShapesWorld pairs.

The tiny LLaVA (cwdpo.model.tiny) is built once into a session tmp dir (~5 s) and loaded per test
(~0.1 s), so tests may mutate their backbone (optimizer steps, LoRA, snapshots) freely.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

# The test models are tiny: intra-op threading only adds synchronisation, and on a shared 2-core
# box an oversubscribed pool makes a 0.1 s forward take 2 s. Override with CWDPO_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("CWDPO_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.gpu` tests (the GPU suite of `make gpu-check`) skip without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make gpu-check)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@dataclass
class TextPairs:
    """Raw preference pairs (images and texts, before collation) — not `cwdpo.batch.PairBatch`,
    the collated tensors the modules train on."""

    images: list[Image.Image]
    prompts: list[str]
    chosen: list[str]
    rejected: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="session")
def tiny_vlm_path(tiny_cache_dir) -> Path:
    from cwdpo.model.tiny import ensure_tiny_vlm

    return ensure_tiny_vlm(tiny_cache_dir)


@pytest.fixture
def backbone(tiny_vlm_path):
    """A fresh policy (no LoRA, no reference yet) with the default seed-0 tiny weights."""
    from cwdpo.model.backbone import VLMBackbone

    torch.manual_seed(0)
    return VLMBackbone.from_pretrained(tiny_vlm_path, max_length=128)


@pytest.fixture(scope="session")
def shapes_pairs():
    """Four ShapesWorld preference pairs (mixed easy / hard negatives), deterministic."""
    from cwdpo.data.shapes import ShapesWorld

    return ShapesWorld().pairs("train", 4)


@pytest.fixture
def pair_batch(shapes_pairs) -> TextPairs:
    return TextPairs(
        images=[p.image.load() for p in shapes_pairs],
        prompts=[p.prompt for p in shapes_pairs],
        chosen=[p.chosen for p in shapes_pairs],
        rejected=[p.rejected for p in shapes_pairs],
    )


def perturb_(model: torch.nn.Module, scale: float = 0.02, seed: int = 1) -> None:
    """Add seeded Gaussian noise to every trainable parameter (a stand-in for training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.fixture
def perturb():
    """`perturb(model, scale=0.02, seed=1)`: seeded in-place noise on trainable parameters."""
    return perturb_
