"""What a collated batch holds: the key conventions every layer shares.

A collated model input is the processor's dict (`input_ids`, `attention_mask`, the family's
vision inputs) plus `labels`, with `IGNORE_INDEX` on every non-response token.
"""

from __future__ import annotations

IGNORE_INDEX = -100
TEXT_KEYS = ("input_ids", "attention_mask", "labels")  # the collated batch's non-vision keys
#: Per-token model inputs some processors return beside input_ids (Gemma3's / PaliGemma's
#: token_type_ids, Qwen's mm_token_type_ids): [rows, width] like input_ids, not vision inputs.
PER_TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")
