"""Tiny LLaVA-NeXT and LLaVA-OneVision builds (anyres image grids)."""

from __future__ import annotations

from cwdpo.model.builders.common import (
    FamilySpec,
    family_tokenizer,
    siglip,
    text_sizes,
    tid,
    vision_sizes,
)
from cwdpo.model.processing import image_only_class

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


def build_llava_next(spec: FamilySpec):
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
    vision = vision_sizes(
        spec,
        image_size=16,
        patch_size=4,
        projection_dim=spec.vision_hidden,
        model_type="clip_vision_model",
    )
    cfg = LlavaNextConfig(
        vision_config=vision,
        text_config={**text_sizes(spec, tok), "model_type": "llama"},
        image_grid_pinpoints=pins,
        image_token_index=tid(tok, "<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=16,
        tie_word_embeddings=False,
    )
    return LlavaNextForConditionalGeneration(cfg), proc


def build_llava_onevision(spec: FamilySpec):
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
        vision_config=siglip(spec, 16, 4),
        text_config={**text_sizes(spec, tok), "model_type": "qwen2"},
        image_grid_pinpoints=pins,
        image_token_index=tid(tok, "<image>"),
        video_token_index=tid(tok, "<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    return LlavaOnevisionForConditionalGeneration(cfg), proc
