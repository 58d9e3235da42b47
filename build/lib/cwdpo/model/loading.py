"""Loading a VLM and preparing it for training: the HF model + processor from a directory or
hub id (errors that name the path), LoRA (peft) settings and presets, vision tower / projector
freezing, and switching dropout off. `cwdpo.model.backbone.VLMBackbone` builds on these."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cwdpo.model.processing import ProcessorLoadError, load_processor


class ModelLoadError(RuntimeError):
    """A model directory / hub id that cannot be used (names the path and what is missing)."""


#: LoRA target presets: peft's "all-linear" (every linear layer but the LM head, vision tower
#: and projector included) or "language" (the language model's attention and MLP projections,
#: the usual choice for VLM preference tuning). Any other string is a peft regex.
LANGUAGE_LORA_TARGETS = (
    r".*(language_model|text_model)\.(model\.)?layers\.\d+\."
    r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
)
LORA_PRESETS = {"language": LANGUAGE_LORA_TARGETS}
#: Module-name patterns of the vision tower and of the projector, across families (Qwen's
#: `visual.merger` is the projector; everything else under `visual` is the tower).
VISION_MODULES = re.compile(r"(^|\.)(visual|vision_tower|vision_model)(\.|$)")
PROJECTOR_MODULES = re.compile(
    r"(^|\.)(multi_modal_projector|connector|merger|deepstack_merger_list)(\.|$)|(^|\.)image_newline$"
)


@dataclass
class LoRASettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Sequence[str] | str = "all-linear"


def lora_settings(lora: LoRASettings | Mapping | None) -> LoRASettings | None:
    """`model.lora` as given in a config: None, LoRASettings, or any mapping (dict or OmegaConf
    DictConfig, e.g. the short form `{r: 4, alpha: 8}`); unset fields keep their defaults."""
    if lora is None or isinstance(lora, LoRASettings):
        return lora
    from omegaconf import OmegaConf

    if OmegaConf.is_config(lora):  # a DictConfig is no `dict`: the short form failed here
        lora = OmegaConf.to_container(lora, resolve=True)
    if not isinstance(lora, Mapping):
        raise TypeError(
            f"model.lora: expected null or a mapping like {{r: 8, alpha: 16}}, got {lora!r}"
        )
    known = set(LoRASettings.__dataclass_fields__)
    unknown = sorted(set(lora) - known)
    if unknown:
        raise ValueError(f"model.lora has unknown key(s) {unknown}; accepted: {sorted(known)}")
    return LoRASettings(**dict(lora))


def module_group(name: str) -> str:
    """ "projector", "vision" or "language" for a parameter/module name of any supported family."""
    if PROJECTOR_MODULES.search(name):
        return "projector"
    if VISION_MODULES.search(name):
        return "vision"
    return "language"


def _in_hf_cache(repo_id: str) -> bool:
    """A hub id counts only if it is already cached (or downloads are explicitly allowed)."""
    import os

    if os.environ.get("CWDPO_ALLOW_DOWNLOAD") == "1":
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def _refuse_text_only(path: str | Path, trust_remote_code: bool) -> None:
    """`ModelLoadError` when `path`'s config is a text-only language model that transformers
    knows (Llama, Qwen2, Gemma3 text...): checked first, so that the error says so instead of
    naming a missing chat template or image processor, the symptoms that come before it. A
    config that cannot be read, or one of a type transformers does not list, is left to the
    loaders below and their own messages."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    try:
        cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception:
        return
    kind = getattr(cfg, "model_type", None)
    if (
        kind in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        or kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or "AutoModelForImageTextToText" in (getattr(cfg, "auto_map", None) or {})
        or getattr(cfg, "vision_config", None) is not None
    ):
        return
    arch = ", ".join(
        getattr(cfg, "architectures", None) or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[kind]]
    )
    raise ModelLoadError(
        f"{path}: a text-only model ({arch}, model_type={kind!r}, no vision config); cwdpo "
        "trains image-text-to-text models (loaded with "
        "AutoModelForImageTextToText: Qwen2-VL, LLaVA, SmolVLM, Gemma 3, ...): point "
        "model.path at a vision-language checkpoint"
    )


def load_model_and_processor(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    chat_template: str | None = None,
    processor_kwargs: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, Any]:
    """Load through AutoModelForImageTextToText / AutoProcessor, with errors that name the path.
    `processor_kwargs` override saved processor settings (e.g. Qwen's min_pixels/max_pixels,
    which bound the image-token count)."""
    from transformers import AutoModelForImageTextToText

    p = Path(str(path))
    if not p.exists() and (
        p.is_absolute() or str(path).startswith(".") or not _in_hf_cache(str(path))
    ):
        raise ModelLoadError(
            f"model path {path} is neither an existing directory nor a hub id in the local "
            "HF cache (set CWDPO_ALLOW_DOWNLOAD=1 to let transformers download a hub id)"
        )
    _refuse_text_only(path, trust_remote_code)
    if p.is_dir() and not any(
        (p / f).is_file()
        for f in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
    ):
        raise ModelLoadError(
            f"model directory {p} has no processor (expected processor_config.json or "
            "preprocessor_config.json + tokenizer files saved with processor.save_pretrained)"
        )
    try:
        processor = load_processor(
            path, trust_remote_code=trust_remote_code, **dict(processor_kwargs or {})
        )
    except ProcessorLoadError as e:
        raise ModelLoadError(str(e)) from e
    if chat_template:
        processor.chat_template = chat_template
    if not getattr(processor, "chat_template", None):
        raise ModelLoadError(
            f"{path}: the processor has no chat template (cwdpo builds prompts with "
            "apply_chat_template); set model.chat_template to a Jinja template"
        )
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise ModelLoadError(
            f"{path}: AutoProcessor returned {type(processor).__name__}, not a multimodal "
            "processor with a tokenizer and an image processor"
        )
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)
    except Exception as e:
        raise ModelLoadError(f"cannot load an image-text-to-text model from {path}: {e}") from e
    return model, processor


def freeze_groups(model: nn.Module, groups: tuple[str, ...]) -> None:
    """Full fine-tuning with the vision tower and/or projector kept fixed."""
    if not groups:
        return
    hit = {g: 0 for g in groups}
    for name, p in model.named_parameters():
        g = module_group(name)
        if g in hit:
            p.requires_grad_(False)
            hit[g] += 1
    missing = [g for g, n in hit.items() if n == 0]
    if missing:
        raise ValueError(
            f"model.freeze_{missing[0]}=true but no {missing[0]} parameters were found in "
            f"{type(model).__name__} (expected module names matching "
            f"{(VISION_MODULES if missing[0] == 'vision' else PROJECTOR_MODULES).pattern})"
        )


def add_lora(model: nn.Module, s: LoRASettings, frozen: tuple[str, ...] = ()) -> nn.Module:
    """peft LoRA; `target_modules` may be a preset (LORA_PRESETS); adapters are never put on
    a frozen vision tower / projector."""
    from peft import LoraConfig, get_peft_model

    target = s.target_modules if isinstance(s.target_modules, str) else list(s.target_modules)
    if isinstance(target, str):
        target = LORA_PRESETS.get(target, target)
    exclude = None
    if frozen:
        exclude = [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and module_group(n) in frozen
        ]
    cfg = LoraConfig(
        r=s.r,
        lora_alpha=s.alpha,
        lora_dropout=s.dropout,
        target_modules=target,
        exclude_modules=exclude or None,
    )
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise ValueError(
            f"model.lora.target_modules={s.target_modules!r} matched no module of "
            f"{type(model).__name__}: {e}"
        ) from e


DROPOUT_ATTRS = (
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "hidden_dropout",
    "attn_dropout",
)


def disable_dropout_(model: nn.Module) -> int:
    """Dropout off in the policy (as TRL's `disable_dropout`): the reference runs in eval mode,
    so with dropout the log-ratios would be noisy and nonzero at step 0. Covers nn.Dropout
    (LoRA's lora_dropout included) and the float probabilities HF modules keep as attributes
    (e.g. CLIP/SigLIP attention's `dropout`, Llama/Qwen attention's `attention_dropout`).
    Returns how many probabilities were set to 0."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            m.p, n = 0.0, n + 1
        for attr in DROPOUT_ATTRS:  # HF modules that pass a float p to F.dropout / SDPA
            if isinstance(getattr(m, attr, None), float) and getattr(m, attr) > 0:
                setattr(m, attr, 0.0)
                n += 1
    return n
