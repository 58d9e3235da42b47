"""The embedded default VLM: a tiny but real LLaVA (CLIP vision tower + projector + Llama).

Built offline from configs, with its own byte-level BPE tokenizer trained on the ShapesWorld
vocabulary, a CLIP image processor and a chat template; saved with `save_pretrained` and
loaded back through `AutoModelForImageTextToText` / `AutoProcessor` — the very code path a
real checkpoint (LLaVA, Qwen2-VL, SmolVLM, PaliGemma) takes. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cwdpo.utils.io import atomic_save_dir

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>"
    "{% elif message['role'] == 'assistant' %}<|assistant|>"
    "{% else %}<|system|>{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = [
    "<pad>",
    "<unk>",
    "<s>",
    "<|end|>",
    "<image>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
]


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny VLM. Changing any field changes the cache key."""

    image_size: int = 32
    patch_size: int = 4
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 256
    vocab_size: int = 512
    max_positions: int = 512
    seed: int = 0
    version: int = 2  # bump when the builder changes

    def key(self) -> str:
        return spec_key(self)


def spec_key(spec: Any, **extra: Any) -> str:
    """Cache key of a build: 12 hex digits of sha256 over the spec's fields (+ `extra`)."""
    blob = json.dumps({**extra, **asdict(spec)}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("CWDPO_CACHE", Path.home() / ".cache" / "cwdpo"))


def _tokenizer_corpus(n_scenes: int = 2000) -> list[str]:
    from cwdpo.data import shapes

    world = shapes.ShapesWorld(shapes.WorldConfig(min_objects=1, max_objects=4), seed=12345)
    lines = []
    for sc in world.scenes("train", n_scenes):
        lines += shapes.references(sc)
    lines += [shapes.PROMPT, " ".join(shapes.DISTRACTORS), " ".join(shapes.vocabulary())]
    rng = random.Random(0)
    words = shapes.vocabulary()
    lines += [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]
    return lines


def train_bpe(vocab_size: int, special_tokens: list[str]):
    """A `tokenizers.Tokenizer`: byte-level BPE trained on the ShapesWorld vocabulary (any UTF-8
    text encodes; ShapesWorld words become single tokens). Shared by the tiny family builds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    return tok


def build_tokenizer(vocab_size: int):
    """The tiny LLaVA's tokenizer: `train_bpe` with its own special tokens."""
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(vocab_size, SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|end|>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=512,
        padding_side="right",
    )


def _tiny_processor(spec: TinySpec, tokenizer: Any):
    """LLaVA-1.5's processor at the tiny sizes: CLIP preprocessing, one `<image>` per patch."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def _tiny_config(spec: TinySpec, tokenizer: Any):
    """LlavaConfig: a CLIP vision tower and a Llama language model at the tiny sizes."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=spec.max_positions,
        **special,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        **special,
        tie_word_embeddings=False,
    )


def tiny_vlm_parts(spec: TinySpec = TinySpec()) -> tuple[Any, Any]:
    """(model, processor) of the tiny LLaVA, in memory (the `llava` family's builder too)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    tokenizer = build_tokenizer(spec.vocab_size)
    processor = _tiny_processor(spec, tokenizer)
    config = _tiny_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, processor


def build_tiny_vlm(out_dir: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Build the tiny LLaVA and its processor into `out_dir` (atomically: temp dir + swap)."""
    model, processor = tiny_vlm_parts(spec)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "cwdpo_tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))

    return atomic_save_dir(out_dir, write)


def tiny_vlm_dir(cache_dir: str | Path | None = None, spec: TinySpec = TinySpec()) -> Path:
    """Where the tiny VLM for `spec` lives in the cache (built or not)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return root / f"tiny-llava-{spec.key()}"


def is_built(path: Path) -> bool:
    """A built directory holds the spec file (the directory appears whole: `atomic_save_dir`)."""
    return (path / "cwdpo_tiny_spec.json").is_file()


def ensure_tiny_vlm(cache_dir: str | Path | None = None, spec: TinySpec = TinySpec()) -> Path:
    """Path of the cached tiny VLM for `spec`, building it on first use."""
    path = tiny_vlm_dir(cache_dir, spec)
    if not is_built(path):
        build_tiny_vlm(path, spec)
    return path


def check_cache_dir(cfg: Any) -> None:
    """The embedded tiny VLM is built into `paths.cache_dir` on first use (from the resolver
    behind `model.path`): a read-only cache must fail here, naming the directory, not as an
    `InterpolationResolutionError` from `model.path` mid-way."""
    from omegaconf import OmegaConf

    from cwdpo.utils.run_dir import check_writable

    raw = OmegaConf.to_container(cfg.model, resolve=False).get("path") if "model" in cfg else None
    if not (isinstance(raw, str) and "tiny_vlm:" in raw):
        return
    cache = Path(str(cfg.paths.cache_dir))
    if not is_built(tiny_vlm_dir(cache)):
        check_writable(
            cache,
            "cache directory (paths.cache_dir, where the tiny VLM is built)",
            "make it writable or set CWDPO_CACHE=<dir> (or paths.cache_dir=<dir>)",
        )
