"""Tiny Gemma3 and PaliGemma builds (SigLIP towers; bidirectional image / prefix attention)."""

from __future__ import annotations

from cwdpo.model.builders.common import (
    FamilySpec,
    family_tokenizer,
    set_generation,
    siglip,
    text_sizes,
    tid,
)

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


GEMMA3_SPECIAL = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]


def _gemma3_tokenizer(spec: FamilySpec):
    # gemma-3-*-it: BOS prepended by the tokenizer *and* written by the template; a turn ends
    # with <end_of_turn>, generation_config.eos_token_id = [<eos>, <end_of_turn>]
    return family_tokenizer(
        spec,
        GEMMA3_SPECIAL,
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


def build_gemma3(spec: FamilySpec):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = _gemma3_tokenizer(spec)
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
    text = text_sizes(
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
        vision_config=siglip(spec, 32, 4),
        mm_tokens_per_image=mm_tokens,
        boi_token_index=tid(tok, "<start_of_image>"),
        eoi_token_index=tid(tok, "<end_of_image>"),
        image_token_index=tid(tok, "<image_soft_token>"),
        tie_word_embeddings=True,
    )
    model = Gemma3ForConditionalGeneration(cfg)
    set_generation(model, tok, [tok.eos_token_id, tid(tok, "<end_of_turn>")])
    return model, proc


def build_paligemma(spec: FamilySpec):
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
    text = text_sizes(
        spec, proc.tokenizer, head_dim=head, model_type="gemma", tie_word_embeddings=True
    )
    cfg = PaliGemmaConfig(
        text_config=text,
        vision_config=siglip(spec, 32, 8),
        projection_dim=spec.text_hidden,
        hidden_size=spec.text_hidden,
        image_token_index=tid(proc.tokenizer, "<image>"),
        vocab_size=len(proc.tokenizer),
        tie_word_embeddings=True,
    )
    return PaliGemmaForConditionalGeneration(cfg), proc
