"""Greedy captions of held-out records: the one generation loop of the end-of-stage evaluation
(`cwdpo.run.evaluation`) and the held-out curve (`cwdpo.callbacks.heldout`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from cwdpo.data.records import CaptionRecord, load_images, record_prompt

if TYPE_CHECKING:
    from cwdpo.model.backbone import VLMBackbone


@torch.no_grad()
def generate_captions(
    backbone: VLMBackbone,
    records: Sequence[CaptionRecord],
    prompt: str,
    batch_size: int = 64,
    max_new_tokens: int = 32,
) -> list[str]:
    """One greedy caption per record, `batch_size` records at a time (the backbone's
    `generate` puts the model in eval mode)."""
    out: list[str] = []
    for s in range(0, len(records), batch_size):
        chunk = records[s : s + batch_size]
        out += backbone.generate(
            [load_images(r) for r in chunk],
            [record_prompt(r, prompt) for r in chunk],
            max_new_tokens=max_new_tokens,
        )
    return out
