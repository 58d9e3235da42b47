"""K samples per record with image + prompt prefilled once (the shared prefill).

`model.generate(**inputs, num_return_sequences=K)` expands every row K times before its
prefill. transformers >= 5 already runs the vision tower before that expansion
(`mm_encoder_outputs`), but the language model still prefills the image tokens and the prompt
K times per record; with 576 image tokens and short captions that prefill is most of the
sampling cost. Here each record is prefilled once and its K continuations are drawn from a
copy of its cache:

1. **prefill**: `model.generate(**inputs, max_new_tokens=1)` on the B records, into a cache we
   own. It is the plain path's own prefill (its position ids, the family's masks: Gemma3's
   bidirectional image spans, PaliGemma's bidirectional prefix, Qwen's M-RoPE from
   `mm_token_type_ids`, whose `rope_deltas` the model keeps), so the cached keys and values
   are the plain path's; its one greedy token is dropped.
2. **expand**: the cache loses its last prompt position (`crop(-1)`) and is repeated K times
   (`batch_repeat_interleave`); so is the per-row state the family keeps on the model between
   `generate` calls (Qwen's `rope_deltas`).
3. **continue**: `model.generate` on the K·B text rows (input ids, attention mask and the
   per-token keys, no pixel inputs) with that cache. HF feeds only the uncached last prompt
   token, whose logits are the plain prefill's last logits, then samples as the plain path
   does (same logits processors, stop tokens, padding). The expanded cache is first copied
   into a preallocated `StaticCache` (`static_copy`, full-attention layers only; HF's
   auto-compile off): the dynamic cache re-concatenates the whole K·B-row image + prompt cache
   at every step, which on the 576-image-token LLaVA shape was half the decoding time.

Why the last token is re-run instead of prefilling all prompt tokens but the last: PaliGemma's
prefix attends bidirectionally, so every prompt token's keys depend on the last one; cropping
a full prefill keeps them exact (prefilling all but the last moved the tiny PaliGemma's
first-token logits by 0.13; LLaVA's and Gemma3's by 2e-6). Sliding-window layers (Gemma3) record their past during the
prefill so that the crop can roll them back.

Exactness (the first-token logits, a teacher-forced continuation against a full forward, and
greedy text equal the plain path's on every family) and "the vision tower and the prompt run
once per record" are tested in tests/test_shared_prefill_sampling.py.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cwdpo.batch import PER_TOKEN_KEYS, TEXT_KEYS

#: Per-row state a family keeps on the model between `generate` calls, read by the next call
#: that continues a cache (Qwen2/2.5/3-VL: the M-RoPE offset of the text after the images).
ROW_STATE_ATTRS = ("rope_deltas",)


def _text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def prefill(model: nn.Module, inputs: dict[str, torch.Tensor], **generate_kwargs: Any):
    """The plain path's prefill of `inputs` (image + prompt rows, left-padded) into a cache,
    via `generate` with one greedy new token (dropped). Returns the cache (every prompt
    position), with sliding-window layers recording their past so that it can be cropped."""
    from transformers import DynamicCache

    cache = DynamicCache(config=_text_config(model))
    if any(cache.is_sliding):
        cache.activate_past_recording()
    kw = {k: v for k, v in generate_kwargs.items() if k in ("pad_token_id", "eos_token_id")}
    model.generate(**inputs, max_new_tokens=1, do_sample=False, cache=cache, use_cache=True, **kw)
    return cache


def expand_prefill(model: nn.Module, cache, rows: int, k: int, static_len: int | None = None):
    """Drop the last cached position (re-run by `generate`), then repeat every row of the cache
    and of the family's per-row model state (ROW_STATE_ATTRS) k times, row-major. Returns the
    cache to continue: a preallocated `StaticCache` of `static_len` positions where asked and
    every layer is a full-attention one (`static_copy`), else `cache` expanded in place."""
    cache.crop(-1)
    for layer in cache.layers:  # rolled back: sliding layers keep only their window again
        if hasattr(layer, "record_past"):
            layer.record_past = False
    for m in model.modules():
        for attr in ROW_STATE_ATTRS:
            v = getattr(m, attr, None)
            if torch.is_tensor(v) and v.ndim and v.shape[0] == rows:
                setattr(m, attr, v.repeat_interleave(k, dim=0))
    static = static_copy(model, cache, k, static_len) if static_len else None
    if static is None:
        cache.batch_repeat_interleave(k)
    return static or cache


def static_copy(model: nn.Module, cache, k: int, max_len: int):
    """The prefix cache, every row k times, in a preallocated `StaticCache` of `max_len`
    positions; None where a layer is not a plain full-attention one (sliding windows keep the
    dynamic cache). Why: the dynamic cache concatenates every layer's K·B-row keys and values
    at every decoding step, a copy of the whole image + prompt cache per token, which is most
    of the decoding time when image tokens dominate; the static one writes in place. Filled
    layer by layer from the unexpanded cache: at most one layer's K·B rows exist twice."""
    from transformers import StaticCache
    from transformers.cache_utils import DynamicLayer

    if any(cache.is_sliding) or any(type(x) is not DynamicLayer for x in cache.layers):
        return None
    static = StaticCache(config=_text_config(model), max_cache_len=max_len)
    if len(static.layers) != len(cache.layers) or any(x.is_sliding for x in static.layers):
        return None
    for dst, src in zip(static.layers, cache.layers):  # allocates [k·B, heads, max_len, dim]
        dst.update(src.keys.repeat_interleave(k, 0), src.values.repeat_interleave(k, 0))
        src.keys = src.values = None  # the unexpanded layer is not needed any more
    return static


def text_rows(inputs: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The text inputs (ids, mask, per-token keys) of every row repeated k times, row-major;
    no vision inputs: the images are in the cache."""
    keys = (*TEXT_KEYS, *PER_TOKEN_KEYS)
    return {n: v.repeat_interleave(k, dim=0) for n, v in inputs.items() if n in keys}


def shared_prefill_generate(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    num_return_sequences: int,
    static: bool = True,
    **kwargs: Any,
):
    """`model.generate(**inputs, num_return_sequences=K, **kwargs)` with each record's image +
    prompt prefilled once: the same rows (K per record, row-major: record i's samples are rows
    i·K … i·K+K-1), each prompt followed by its continuation, or the same GenerateOutput."""
    k = int(num_return_sequences)
    if k < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {k}")
    if kwargs.get("num_beams", 1) != 1:
        raise ValueError("the shared prefill draws samples or greedy rows; use num_beams=1")
    if not kwargs.get("use_cache", True):
        raise ValueError("the shared prefill continues a KV cache; use_cache=False cannot")
    rows, width = inputs["input_ids"].shape
    cache = prefill(model, inputs, **kwargs)
    new = kwargs.get("max_new_tokens") if static else None
    cache = expand_prefill(model, cache, rows, k, width + int(new) if new else None)
    kwargs = {**kwargs, "use_cache": True}
    # a static cache: HF would compile the decoding on a GPU, for shapes that change per refresh
    if any(getattr(x, "is_compileable", False) for x in cache.layers):
        kwargs.setdefault("disable_compile", True)
    return model.generate(**text_rows(inputs, k), cache=cache, **kwargs)


def sample_ids(
    model: nn.Module, inputs: dict[str, torch.Tensor], k: int, shared: bool = True, **kwargs: Any
):
    """k rows per record (row-major), prompt + continuation ids: the shared prefill where it
    saves work (k > 1 and `shared`), else the plain `model.generate` (HF expands the rows)."""
    if shared and k > 1:
        return shared_prefill_generate(model, inputs, k, **kwargs)
    return model.generate(**inputs, **kwargs, num_return_sequences=k)
