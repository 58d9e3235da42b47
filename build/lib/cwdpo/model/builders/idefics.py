"""Tiny Idefics3 and SmolVLM builds (image splitting into tiles + a global view)."""

from __future__ import annotations

from cwdpo.model.builders.common import (
    FamilySpec,
    family_tokenizer,
    text_sizes,
    tid,
    vision_sizes,
)
from cwdpo.model.processing import image_only_class

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
        vision_config=vision_sizes(spec, image_size=16, patch_size=4),
        text_config=text_sizes(spec, tok, tie_word_embeddings=False),
        scale_factor=2,
        image_token_id=tid(tok, "<image>"),
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
    )
    return model_cls(cfg), proc


def build_idefics3(spec: FamilySpec):
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


def build_smolvlm(spec: FamilySpec):
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
