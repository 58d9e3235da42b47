"""Tiny random-weight builds of every supported open VLM family, offline.

The offline equivalent of the hub's ``tiny-random-*`` test models: for each family the *real*
transformers config, model, processor and (PIL) image-processor classes with tiny dims, a
byte-level BPE tokenizer trained on the ShapesWorld vocabulary that carries the family's own
special tokens (BOS handling, image placeholders, turn-end token), and a chat template shaped
like the released checkpoint's. Each build is saved with ``save_pretrained`` and loads back
through ``AutoModelForImageTextToText`` / ``AutoProcessor`` — the path a real checkpoint takes —
so the family test matrix (tests/test_families.py), ``cwdpo.doctor`` and ``cwdpo.bench --model``
exercise the same code a researcher's model does.

Adding a family: write a ``_build_<name>(tok, spec) -> (model, processor)`` below (start from the
closest existing one: copy its chat template from the real ``chat_template.jinja``, keep the real
special tokens) and register it in ``FAMILIES``; the test matrix picks it up.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cwdpo.model.processing import image_only_class
from cwdpo.model.tiny import default_cache_dir, train_bpe
from cwdpo.utils.io import atomic_save_dir


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
        blob = json.dumps({"family": family, **asdict(self)}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class Family:
    """One registered family: its builder and what the test matrix should expect of it."""

    name: str
    build: Callable[[FamilySpec], tuple[Any, Any]]
    model_type: str
    multi_image: bool = True  # can one sample hold several images


# ---------------------------------------------------------------------------- tokenizers
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


def _tid(tok, token: str) -> int:
    i = tok.convert_tokens_to_ids(token)
    if i is None or i == tok.unk_token_id:
        raise KeyError(f"token {token!r} is not in the tiny tokenizer")
    return i


def _set_generation(model: Any, tok, eos_ids: list[int]) -> None:
    g = model.generation_config
    g.pad_token_id = tok.pad_token_id
    g.bos_token_id = tok.bos_token_id
    g.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]


def _text_sizes(spec: FamilySpec, tok, **extra: Any) -> dict[str, Any]:
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


def _vision_sizes(spec: FamilySpec, **extra: Any) -> dict[str, Any]:
    return {
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_hidden * 2,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.vision_heads,
        **extra,
    }


# ---------------------------------------------------------------------------- Qwen2/2.5/3-VL
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
        "image_token_id": _tid(tok, "<|image_pad|>"),
        "video_token_id": _tid(tok, "<|video_pad|>"),
        "vision_start_token_id": _tid(tok, "<|vision_start|>"),
        "vision_end_token_id": _tid(tok, "<|vision_end|>"),
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
    return _text_sizes(
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


def _build_qwen2_vl(spec: FamilySpec):
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


def _build_qwen2_5_vl(spec: FamilySpec):
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


def _build_qwen3_vl(spec: FamilySpec):
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


# ---------------------------------------------------------------------------- Idefics3 / SmolVLM
IDEFICS_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    "<end_of_utterance>",
] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SMOLVLM_TEMPLATE = IDEFICS3_TEMPLATE.replace("<|begin_of_text|>", "<|im_start|>", 1)


def _idefics_like(spec: FamilySpec, tok, template: str, ip_cls, proc_cls, cfg_cls, model_cls):
    """Idefics3 / SmolVLM: 32-pixel longest edge split into 2×2 tiles of 16² + a global view,
    4-pixel patches, pixel shuffle ×2 → 4 tokens per tile."""
    ip = ip_cls(
        do_image_splitting=True,
        size={"longest_edge": 32},
        max_image_size={"longest_edge": 16},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    seq = (16 // 4) ** 2 // 4  # (image_size / patch)² / scale_factor²
    proc = proc_cls(image_processor=ip, tokenizer=tok, image_seq_len=seq, chat_template=template)
    cfg = cfg_cls(
        vision_config=_vision_sizes(spec, image_size=16, patch_size=4),
        text_config=_text_sizes(spec, tok, tie_word_embeddings=False),
        scale_factor=2,
        image_token_id=_tid(tok, "<image>"),
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
    )
    return model_cls(cfg), proc


def _build_idefics3(spec: FamilySpec):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    # Idefics3-8B (Llama-3): the tokenizer prepends <|begin_of_text|> and the template writes it too
    tok = family_tokenizer(
        spec,
        IDEFICS_SPECIAL,
        bos="<|begin_of_text|>",
        eos="<end_of_utterance>",
        pad="<|end_of_text|>",
        add_bos=True,
    )
    return _idefics_like(
        spec,
        tok,
        IDEFICS3_TEMPLATE,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
    )


def _build_smolvlm(spec: FamilySpec):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    # SmolVLM2 (SmolLM2): <|im_start|> is BOS but the tokenizer does not prepend it
    tok = family_tokenizer(
        spec,
        ["<|im_start|>", "<|im_end|>", *IDEFICS_SPECIAL[2:]],
        bos="<|im_start|>",
        eos="<end_of_utterance>",
        pad="<|im_end|>",
    )
    return _idefics_like(
        spec,
        tok,
        SMOLVLM_TEMPLATE,
        SmolVLMImageProcessorPil,
        image_only_class(SmolVLMProcessor),
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )


# ---------------------------------------------------------------------------- Gemma3 / PaliGemma
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
#: PaliGemma ships no chat template: the prompt is plain text and the processor adds image
#: tokens, BOS and the "\n" separator itself (the same template conf/model/paligemma.yaml sets).
PALIGEMMA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endif %}{% endfor %}"
)


def _siglip(spec: FamilySpec, image_size: int, patch: int) -> dict[str, Any]:
    return _vision_sizes(
        spec, image_size=image_size, patch_size=patch, model_type="siglip_vision_model"
    )


def _build_gemma3(spec: FamilySpec):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    # gemma-3-*-it: BOS prepended by the tokenizer *and* written by the template; a turn ends
    # with <end_of_turn>, generation_config.eos_token_id = [<eos>, <end_of_turn>]
    tok = family_tokenizer(
        spec,
        [
            "<pad>",
            "<eos>",
            "<bos>",
            "<unk>",
            "<start_of_turn>",
            "<end_of_turn>",
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
        ],
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        add_bos=True,
        extra={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    ip = Gemma3ImageProcessorPil(
        size={"height": 32, "width": 32},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        do_pan_and_scan=False,
    )
    mm_tokens = 4  # 32/4 = 8×8 patches pooled to 2×2
    proc = Gemma3Processor(
        image_processor=ip, tokenizer=tok, chat_template=GEMMA3_TEMPLATE, image_seq_length=mm_tokens
    )
    head = spec.text_hidden // spec.text_heads
    text = _text_sizes(
        spec,
        tok,
        head_dim=head,
        query_pre_attn_scalar=head,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"][: spec.text_layers],
        tie_word_embeddings=True,
    )
    cfg = Gemma3Config(
        text_config=text,
        vision_config=_siglip(spec, 32, 4),
        mm_tokens_per_image=mm_tokens,
        boi_token_index=_tid(tok, "<start_of_image>"),
        eoi_token_index=_tid(tok, "<end_of_image>"),
        image_token_index=_tid(tok, "<image_soft_token>"),
        tie_word_embeddings=True,
    )
    model = Gemma3ForConditionalGeneration(cfg)
    _set_generation(model, tok, [tok.eos_token_id, _tid(tok, "<end_of_turn>")])
    return model, proc


def _build_paligemma(spec: FamilySpec):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = family_tokenizer(
        spec,
        ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"],
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        add_bos=True,
        extra={"image_token": "<image>"},
    )
    ip = SiglipImageProcessorPil(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    ip.image_seq_length = (32 // 8) ** 2
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok, chat_template=PALIGEMMA_TEMPLATE)
    head = spec.text_hidden // spec.text_heads
    # paligemma-3b-*: a Gemma (v1) text model, sdpa attention (PaliGemma2's Gemma2 soft-caps
    # attention logits and runs eager)
    text = _text_sizes(
        spec, proc.tokenizer, head_dim=head, model_type="gemma", tie_word_embeddings=True
    )
    cfg = PaliGemmaConfig(
        text_config=text,
        vision_config=_siglip(spec, 32, 8),
        projection_dim=spec.text_hidden,
        hidden_size=spec.text_hidden,
        image_token_index=_tid(proc.tokenizer, "<image>"),
        vocab_size=len(proc.tokenizer),
        tie_word_embeddings=True,
    )
    return PaliGemmaForConditionalGeneration(cfg), proc


# ---------------------------------------------------------------------------- LLaVA family
LLAVA_NEXT_TEMPLATE = (  # llava-v1.6-mistral-7b-hf
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]'}}{% elif message['role'] == 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}"
)
ONEVISION_TEMPLATE = (  # llava-onevision-qwen2-*-ov-hf
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)


def _build_llava_next(spec: FamilySpec):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    tok = family_tokenizer(
        spec,
        ["<s>", "</s>", "<unk>", "<image>", "[INST]", "[/INST]"],
        bos="<s>",
        eos="</s>",
        pad="<unk>",
        unk="<unk>",
        add_bos=True,
        extra={"image_token": "<image>"},
    )
    pins = [[16, 32], [32, 16], [32, 32]]
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16},
        crop_size={"height": 16, "width": 16},
        image_grid_pinpoints=pins,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    proc = LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_TEMPLATE,
    )
    vision = _vision_sizes(
        spec,
        image_size=16,
        patch_size=4,
        projection_dim=spec.vision_hidden,
        model_type="clip_vision_model",
    )
    cfg = LlavaNextConfig(
        vision_config=vision,
        text_config={**_text_sizes(spec, tok), "model_type": "llama"},
        image_grid_pinpoints=pins,
        image_token_index=_tid(tok, "<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=16,
        tie_word_embeddings=False,
    )
    return LlavaNextForConditionalGeneration(cfg), proc


def _build_llava_onevision(spec: FamilySpec):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = family_tokenizer(
        spec,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra={"image_token": "<image>", "video_token": "<video>"},
    )
    pins = [[16, 16], [16, 32], [32, 16], [32, 32]]
    ip = LlavaOnevisionImageProcessorPil(
        size={"height": 16, "width": 16},
        image_grid_pinpoints=pins,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    proc = image_only_class(LlavaOnevisionProcessor)(
        image_processor=ip,
        tokenizer=tok,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        chat_template=ONEVISION_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )
    cfg = LlavaOnevisionConfig(
        vision_config=_siglip(spec, 16, 4),
        text_config={**_text_sizes(spec, tok), "model_type": "qwen2"},
        image_grid_pinpoints=pins,
        image_token_index=_tid(tok, "<image>"),
        video_token_index=_tid(tok, "<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    return LlavaOnevisionForConditionalGeneration(cfg), proc


def _build_llava(spec: FamilySpec):
    """LLaVA-1.5: the embedded tiny LLaVA (cwdpo.model.tiny), unchanged."""
    raise NotImplementedError  # built by cwdpo.model.tiny.build_tiny_vlm (see build_family)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llava", _build_llava, "llava"),
        Family("llava_next", _build_llava_next, "llava_next"),
        Family("llava_onevision", _build_llava_onevision, "llava_onevision"),
        Family("qwen2_vl", _build_qwen2_vl, "qwen2_vl"),
        Family("qwen2_5_vl", _build_qwen2_5_vl, "qwen2_5_vl"),
        Family("qwen3_vl", _build_qwen3_vl, "qwen3_vl"),
        Family("idefics3", _build_idefics3, "idefics3"),
        Family("smolvlm", _build_smolvlm, "smolvlm"),
        Family("gemma3", _build_gemma3, "gemma3"),
        Family("paligemma", _build_paligemma, "paligemma"),
    )
}


def build_family(name: str, out_dir: str | Path, spec: FamilySpec = FamilySpec()) -> Path:
    """Build family `name` with random weights into `out_dir` (atomically: temp dir + swap)."""
    import torch

    if name not in FAMILIES:
        raise KeyError(f"unknown VLM family {name!r}; known: {sorted(FAMILIES)}")
    out_dir = Path(out_dir)
    if name == "llava":
        from cwdpo.model.tiny import build_tiny_vlm

        return build_tiny_vlm(out_dir)
    torch.manual_seed(spec.seed)
    model, processor = FAMILIES[name].build(spec)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        meta = json.dumps({"family": name, **asdict(spec)}, indent=2)
        (tmp / "cwdpo_family.json").write_text(meta)

    return atomic_save_dir(out_dir, write)


def ensure_family(
    name: str, cache_dir: str | Path | None = None, spec: FamilySpec = FamilySpec()
) -> Path:
    """Path of the cached tiny build of family `name`, building it on first use."""
    if name == "llava":
        from cwdpo.model.tiny import ensure_tiny_vlm

        return ensure_tiny_vlm(cache_dir)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / f"tiny-{name}-{spec.key(name)}"
    if not (path / "cwdpo_family.json").is_file():
        build_family(name, path, spec)
    return path
