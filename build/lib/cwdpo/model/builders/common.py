"""What every tiny family build shares: the sizes (`FamilySpec`), the ShapesWorld BPE with a
family's special tokens (`family_tokenizer`), and config fragments of the text / vision towers."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

from cwdpo.model.tiny import spec_key, train_bpe


@dataclass(frozen=True)
class FamilySpec:
    """Sizes shared by every tiny family build. Changing a field changes the cache key."""

    vision_hidden: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    vocab_size: int = 512
    seed: int = 0
    version: int = 1  # bump when a builder changes

    def key(self, family: str) -> str:
        return spec_key(self, family=family)


@functools.lru_cache(maxsize=4)
def _base_bpe(vocab_size: int):
    return train_bpe(vocab_size, ["<|tiny_unk|>"])


def family_tokenizer(
    spec: FamilySpec,
    special: list[str],
    *,
    bos: str | None = None,
    eos: str,
    pad: str,
    unk: str | None = None,
    add_bos: bool = False,
    extra: dict[str, str] | None = None,
):
    """The shared ShapesWorld BPE with a family's special tokens added (as in the real
    tokenizers, where they are added tokens); `add_bos` mirrors whether the real tokenizer
    prepends BOS on encode (Llama-3/Gemma: yes; Qwen/SmolLM: no)."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    named = [t for t in (bos, eos, pad, unk) if t]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=copy.deepcopy(_base_bpe(spec.vocab_size)),
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        extra_special_tokens=extra or {},
        add_bos_token=add_bos,
        add_eos_token=False,
        model_max_length=4096,
        padding_side="right",
    )
    tok.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in special if t not in named],
        special_tokens=True,
    )
    return tok


def tid(tok, token: str) -> int:
    i = tok.convert_tokens_to_ids(token)
    if i is None or i == tok.unk_token_id:
        raise KeyError(f"token {token!r} is not in the tiny tokenizer")
    return i


def set_generation(model: Any, tok, eos_ids: list[int]) -> None:
    g = model.generation_config
    g.pad_token_id = tok.pad_token_id
    g.bos_token_id = tok.bos_token_id
    g.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]


def text_sizes(spec: FamilySpec, tok, **extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tok),
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_intermediate,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "max_position_embeddings": 4096,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        **extra,
    }


def vision_sizes(spec: FamilySpec, **extra: Any) -> dict[str, Any]:
    return {
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_hidden * 2,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.vision_heads,
        **extra,
    }


def siglip(spec: FamilySpec, image_size: int, patch: int) -> dict[str, Any]:
    return vision_sizes(
        spec, image_size=image_size, patch_size=patch, model_type="siglip_vision_model"
    )
