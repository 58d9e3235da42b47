"""Texts + processed prompts → the collated rows `VLMBackbone.collate` / `collate_pairs` return.

Why a module of its own: a preference pair shares its image and prompt, so `collate_pairs`
runs the processor (image preprocessing + prompt tokenization, the costly part of collation)
once per pair and builds the chosen and the rejected row from that one result (issue 26; it
used to process every image twice, once per row). `prompt_parts` lays out a user turn,
`text_rows` turns prompt ids + responses into the padded text keys under the truncation policy,
`repeat_pairs` gives the once-processed vision inputs to both halves of a pair batch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from cwdpo.errors import DataError
from cwdpo.model.truncation import fit_responses, pad_rows

#: `<image k>` placeholders (MMMU) put image k where the question refers to it.
IMAGE_PLACEHOLDER = re.compile(r"<image (\d+)>")

#: PER_TOKEN_KEYS (Gemma3's / PaliGemma's token_type_ids: bidirectional image / prefix
#: attention; Qwen's mm_token_type_ids: M-RoPE) come from the processor at prompt width;
#: `text_rows` extends them over the response with the value below. PaliGemma marks its
#: causal suffix with token_type_ids = 1 (its processor does so for `suffix=`); everywhere else
#: the response is plain text (0).
RESPONSE_TOKEN_TYPE = {("paligemma", "token_type_ids"): 1}


def prompt_parts(prompt: str, n_images: int = 1) -> tuple[list[dict[str, Any]], list[int]]:
    """User-turn content parts and the order in which the images fill them. `<image k>`
    placeholders (MMMU) put image k where the text refers to it (the text around them is
    kept verbatim); images the text does not place come first (the usual "image, then
    question" layout)."""
    parts: list[dict[str, Any]] = []
    order: list[int] = []
    pos = 0
    for m in IMAGE_PLACEHOLDER.finditer(prompt):
        k = int(m.group(1)) - 1
        if not 0 <= k < n_images:
            raise DataError(
                f"prompt {prompt[:80]!r} refers to <image {k + 1}> but its row has "
                f"{n_images} image(s)"
            )
        if prompt[pos : m.start()].strip():
            parts.append({"type": "text", "text": prompt[pos : m.start()]})
        parts.append({"type": "image"})
        order.append(k)
        pos = m.end()
    if prompt[pos:].strip() or not parts:
        parts.append({"type": "text", "text": prompt[pos:]})
    lead = [k for k in range(n_images) if k not in order]
    return [{"type": "image"} for _ in lead] + parts, lead + order


def check_pair_columns(
    images: Sequence[Any], prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]
) -> None:
    """One image entry, prompt, chosen and rejected text per pair, and two different texts."""
    if not (len(images) == len(prompts) == len(chosen) == len(rejected)):
        raise ValueError(
            f"images, prompts, chosen and rejected must have the same length: {len(images)}, "
            f"{len(prompts)}, {len(chosen)}, {len(rejected)}"
        )
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        if " ".join(c.split()) == " ".join(r.split()):
            raise DataError(
                f"preference pair {i} of the batch (prompt {prompts[i]!r}): chosen and "
                f"rejected are identical ({c!r}); a pair needs two different responses"
            )


def text_rows(
    backbone: Any,
    prompt_ids: list[list[int]],
    per_token: dict[str, list[list[int]]],
    prompts: Sequence[str],
    responses: Sequence[str],
) -> dict[str, torch.Tensor]:
    """`input_ids` / `attention_mask` / `labels` (+ per-token keys) of prompt + response rows:
    the response and its turn-end token carry the labels; a row over `backbone.max_length` is
    handled by `backbone.truncation` (`cwdpo.model.truncation`)."""
    resps = []
    for i, r in enumerate(responses):
        if not r or not r.strip():
            raise DataError(f"empty response text in batch row {i} (prompt {prompts[i]!r})")
        resps.append(backbone.response_ids(r))
    resps = fit_responses(
        [len(p) for p in prompt_ids],
        resps,
        backbone.max_length,
        backbone.truncation,
        backbone.truncation_stats,
        lambda i: f"batch row {i} (prompt {prompts[i][:60]!r}, response {responses[i][:60]!r})",
    )
    fills = {k: RESPONSE_TOKEN_TYPE.get((backbone.model_type, k), 0) for k in per_token}
    return pad_rows(prompt_ids, resps, per_token, backbone.tokenizer.pad_token_id, fills)


def repeat_pairs(vision: dict[str, Any]) -> dict[str, Any]:
    """Vision inputs processed once for n pairs → the same inputs for the 2n rows (chosen rows,
    then rejected rows), exactly as the processor would return them for the doubled row list.

    Every processor lays its vision inputs out along dim 0 in row order, whatever the unit:
    one entry per row (Idefics3/SmolVLM `pixel_values` [rows, tiles, C, H, W] and
    `pixel_attention_mask`, OneVision's `batch_num_images`), per image (LLaVA, Gemma3,
    PaliGemma `pixel_values` [images, C, H, W], LLaVA-NeXT/OneVision `image_sizes`, Qwen's
    `image_grid_thw`), or per patch (Qwen's packed `pixel_values` [Σ t·h·w, D]); padding
    widths (tiles, patches) are the batch maximum, which the doubled list does not change. So
    the rows n..2n-1 are the concatenation of the same tensor once more. 0-d values (no row
    axis) are kept as they are; tests/test_collate_pairs.py checks every family, multi-image
    rows included, against the processor run on the doubled rows.
    """
    out: dict[str, Any] = {}
    for k, v in vision.items():
        if torch.is_tensor(v):
            out[k] = torch.cat([v, v]) if v.ndim else v
        elif isinstance(v, list):
            out[k] = v + v
        else:
            raise TypeError(
                f"processor output {k!r} is a {type(v).__name__}: collate_pairs knows how to "
                "give tensors and lists to both rows of a pair"
            )
    return out
