"""What a collated batch holds: the key conventions every layer shares, and the two batch types
the data modules hand to the stages.

A collated model input is the processor's dict (`input_ids`, `attention_mask`, the family's
vision inputs) plus `labels`, with `IGNORE_INDEX` on every non-response token.

`CaptionBatch` (one response per image: base SFT, SFT-C without gentle negatives) and
`PairBatch` (two responses per image: SFT-C with gentle negatives, CW-DPO) are dataclasses, so
Lightning moves their tensors to the device field by field (`apply_to_collection` handles
dataclasses); the text and id fields stay on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100
TEXT_KEYS = ("input_ids", "attention_mask", "labels")  # the collated batch's non-vision keys
#: Per-token model inputs some processors return beside input_ids (Gemma3's / PaliGemma's
#: token_type_ids, Qwen's mm_token_type_ids): [rows, width] like input_ids, not vision inputs.
PER_TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")

ModelInputs = dict[str, torch.Tensor]
"""`VLMBackbone.collate` output for R rows of width T (the longest row; rows are right-padded):

- `input_ids` [R, T] long: image tokens + prompt + response + turn-end token, then the
  tokenizer's pad id;
- `attention_mask` [R, T] long: 1 on real tokens, 0 on padding;
- `labels` [R, T] long: `input_ids` on the response and its turn-end token, `IGNORE_INDEX` on
  image, prompt and padding positions (unshifted: the loss shifts by one);
- `PER_TOKEN_KEYS` [R, T], when the processor returns them;
- the family's vision inputs (`pixel_values`, `image_grid_thw`, ...) as the processor shapes them.
"""


def is_dataset_negative(source: str) -> bool:
    """A rejected text from the data (its reference log-probs may be cached), not sampled from
    the policy (`"on_policy"`, self-judged `"self:…"`)."""
    return source != "on_policy" and not source.startswith("self:")


def is_easy_negative(source: str) -> bool:
    """A trivially wrong (off-image) rejected text: `"easy:…"`."""
    return source.startswith("easy")


def negative_flags(sources: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`PairBatch.neg_is_dataset`, `PairBatch.neg_is_easy` of the pairs' rejected-text sources."""
    return (
        torch.tensor([float(is_dataset_negative(s)) for s in sources]),
        torch.tensor([float(is_easy_negative(s)) for s in sources]),
    )


@dataclass
class CaptionBatch:
    """Base SFT / SFT-C without negatives: one positive response per image.

    - `inputs`: `ModelInputs` of `n` rows, row i = image i with one of its references;
    - `n`: rows (= images) in the batch, the `batch_size` of every logged metric.
    """

    inputs: ModelInputs
    n: int


@dataclass
class PairBatch:
    """A (chosen, rejected) pair per image: SFT-C's gentle negatives and CW-DPO's pairs.

    - `inputs`: `ModelInputs` of 2n rows (`VLMBackbone.collate_pairs`): rows 0..n-1 are the
      chosen responses, row n+i the rejected response to the same image and prompt as row i;
    - `n`: pairs in the batch;
    - `chosen`, `rejected`: the response texts of the n pairs (empty when not recorded);
    - `image_ids`: the image of each pair (empty when not recorded);
    - `sources`: where each rejected text came from (`"on_policy"`, `"easy:…"`, `"hard:…"`,
      `"self:…"`, a dataset's own tag; empty when not recorded);
    - `neg_is_dataset` [n] float: 1.0 where the rejected text is a dataset negative (whose
      reference log-probs may be cached), 0.0 for on-policy / self-judged ones; None when unknown;
    - `neg_is_easy` [n] float: 1.0 where the rejected text is an easy (off-image) negative;
      None when unknown (the same pairs as `neg_is_dataset`).
    """

    inputs: ModelInputs
    n: int
    chosen: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    neg_is_dataset: torch.Tensor | None = None
    neg_is_easy: torch.Tensor | None = None


Batch = CaptionBatch | PairBatch
