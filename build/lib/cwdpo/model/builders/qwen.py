"""Tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL builds (M-RoPE, packed patches, 2×2 merge)."""

from __future__ import annotations

from typing import Any

from cwdpo.model.builders.common import (
    FamilySpec,
    family_tokenizer,
    text_sizes,
    tid,
)
from cwdpo.model.processing import image_only_class

QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN2_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen_tokenizer(spec: FamilySpec):
    # Qwen-VL-Instruct: no BOS, eos = <|im_end|>, pad = <|endoftext|>
    return family_tokenizer(
        spec,
        QWEN_SPECIAL,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )


def _qwen_ids(tok) -> dict[str, int]:
    return {
        "image_token_id": tid(tok, "<|image_pad|>"),
        "video_token_id": tid(tok, "<|video_pad|>"),
        "vision_start_token_id": tid(tok, "<|vision_start|>"),
        "vision_end_token_id": tid(tok, "<|vision_end|>"),
    }


def _qwen_image_processor(patch: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    f = patch * 2  # patch × merge: a 32×32 ShapesWorld image → 4×4 patches → 4 tokens
    return Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=(2 * f) ** 2,
        max_pixels=(2 * f) ** 2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )


def _qwen_text(spec: FamilySpec, tok) -> dict[str, Any]:
    head = spec.text_hidden // spec.text_heads
    s = head // 2
    section = [s - 2 * (s // 3), s // 3, s // 3]
    return text_sizes(
        spec,
        tok,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
    )


def _qwen_vision(spec: FamilySpec, **extra: Any) -> dict[str, Any]:
    """Qwen2.5-VL / Qwen3-VL vision tower: 8-pixel patches, 2×2 merge, projected to the LM."""
    return {
        "depth": spec.vision_layers,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_hidden * 2,
        "out_hidden_size": spec.text_hidden,
        "num_heads": spec.vision_heads,
        "patch_size": 8,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        **extra,
    }


def build_qwen2_vl(spec: FamilySpec):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tok = _qwen_tokenizer(spec)
    proc = image_only_class(Qwen2VLProcessor)(
        image_processor=_qwen_image_processor(8), tokenizer=tok, chat_template=QWEN2_TEMPLATE
    )
    cfg = Qwen2VLConfig(
        text_config=_qwen_text(spec, tok),
        vision_config={
            "depth": spec.vision_layers,
            "embed_dim": spec.vision_hidden,
            "hidden_size": spec.text_hidden,
            "num_heads": spec.vision_heads,
            "mlp_ratio": 2,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        **_qwen_ids(tok),
        tie_word_embeddings=False,
    )
    return Qwen2VLForConditionalGeneration(cfg), proc


def build_qwen2_5_vl(spec: FamilySpec):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )

    tok = _qwen_tokenizer(spec)
    proc = image_only_class(Qwen2_5_VLProcessor)(
        image_processor=_qwen_image_processor(8), tokenizer=tok, chat_template=QWEN2_TEMPLATE
    )
    cfg = Qwen2_5_VLConfig(
        text_config=_qwen_text(spec, tok),
        vision_config=_qwen_vision(spec, window_size=32, fullatt_block_indexes=[0]),
        **_qwen_ids(tok),
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(cfg), proc


def build_qwen3_vl(spec: FamilySpec):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    tok = _qwen_tokenizer(spec)
    proc = image_only_class(Qwen3VLProcessor)(
        image_processor=_qwen_image_processor(8), tokenizer=tok, chat_template=QWEN3_TEMPLATE
    )
    text = _qwen_text(spec, tok)
    text["head_dim"] = spec.text_hidden // spec.text_heads
    text["rope_parameters"]["mrope_interleaved"] = True
    cfg = Qwen3VLConfig(
        text_config=text,
        vision_config=_qwen_vision(
            spec, depth=2, num_position_embeddings=16, deepstack_visual_indexes=[0]
        ),
        **_qwen_ids(tok),
        tie_word_embeddings=False,
    )
    return Qwen3VLForConditionalGeneration(cfg), proc
