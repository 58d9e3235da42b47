"""What differs between VLM processors, resolved once at load time.

- Processors that bundle a video processor (Qwen2/2.5/3-VL, SmolVLM, LLaVA-OneVision) import
  torchvision for it. cwdpo only feeds images, so where torchvision is missing (the CPU torch
  wheels these machines carry have no matching torchvision on PyPI) the same processor class is
  built without its video processor; image preprocessing then runs on the PIL backend.
- The turn-end token: responses are trained to end with the token the chat template closes an
  assistant turn with (`<|im_end|>`, `<end_of_turn>`, `<end_of_utterance>`, `</s>` ...), which is
  not always the tokenizer's `eos_token` (Gemma3-it: `<eos>` vs `<end_of_turn>`).
- BOS: a template that writes `bos_token` itself, rendered as text and then tokenized by a
  tokenizer that prepends BOS too, gives two; `strip_duplicate_bos` keeps one.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any


class ProcessorLoadError(RuntimeError):
    """A processor that cannot be built (names the path, the class and why)."""


def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def has_video_processor(cls: type) -> bool:
    return "video_processor" in inspect.signature(cls.__init__).parameters


@functools.cache
def image_only_class(cls: type) -> type:
    """`cls` (a ProcessorMixin subclass) without its video processor: same name, same saved
    format, same image/text behaviour; asking it for videos raises."""
    if not has_video_processor(cls):
        return cls

    # ProcessorMixin reads the __init__ parameters (signature and __code__) to save and reload
    # its kwargs, so the subclass spells out the parent's, minus video_processor.
    params = [
        p
        for n, p in inspect.signature(cls.__init__).parameters.items()
        if n not in ("self", "video_processor")
    ]
    ns: dict[str, Any] = {"_parent": cls.__init__}
    head, call = [], []
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            head.append(f"**{p.name}")
            call.append(f"**{p.name}")
        elif p.kind is p.VAR_POSITIONAL:
            continue
        else:
            ns[f"_d_{p.name}"] = None if p.default is p.empty else p.default
            head.append(f"{p.name}=_d_{p.name}")
            call.append(f"{p.name}={p.name}")
    src = (
        f"def __init__(self, {', '.join(head)}):\n"
        f"    _parent(self, {', '.join(call)}, video_processor=None)\n"
    )
    exec(src, ns)  # noqa: S102 - a generated signature, no user input
    __init__ = ns["__init__"]
    sub = type(
        cls.__name__,
        (cls,),
        {
            "__init__": __init__,
            "__module__": cls.__module__,
            "video_processor": None,
            "cwdpo_image_only": True,
        },
    )
    return sub


def _processor_class_name(path: Path) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        f = path / name
        if f.is_file():
            try:
                cls = json.loads(f.read_text()).get("processor_class")
            except (json.JSONDecodeError, AttributeError):
                cls = None
            if cls:
                return cls
    cfg = path / "config.json"
    if cfg.is_file():
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        model_type = json.loads(cfg.read_text()).get("model_type")
        return PROCESSOR_MAPPING_NAMES.get(model_type)
    return None


def load_processor(path: str | Path, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """AutoProcessor, or — where that fails for want of torchvision — the same processor class
    built without its video processor. `kwargs` go to `from_pretrained` (e.g. Qwen's
    `min_pixels` / `max_pixels`). Errors name the path, the class and the fix."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, **kwargs
        )
    except Exception as first:
        name = _processor_class_name(Path(str(path))) if Path(str(path)).is_dir() else None
        cls = None
        if name:
            from transformers.models.auto.processing_auto import processor_class_from_name

            cls = processor_class_from_name(name)
        if cls is None or not has_video_processor(cls):
            raise ProcessorLoadError(
                f"cannot load a processor from {path}: {type(first).__name__}: {first}"
            ) from first
        try:
            return image_only_class(cls).from_pretrained(str(path), **kwargs)
        except Exception as e:
            raise ProcessorLoadError(
                f"cannot load {name} from {path}: it needs torchvision for its video processor "
                f"({type(first).__name__}: {first}), and building it without one failed too "
                f"({type(e).__name__}: {e}); install the torchvision that matches your torch"
            ) from e


def render_prompt(processor: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    """The chat template rendered as text (through the tokenizer: processor-level wrappers may
    consult a video processor an image-only processor does not have)."""
    return processor.tokenizer.apply_chat_template(
        messages, chat_template=processor.chat_template, tokenize=False, **kwargs
    )


def adds_bos(tokenizer: Any) -> bool:
    """Does encoding plain text prepend the BOS token?"""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def strip_duplicate_bos(text: str, tokenizer: Any) -> str:
    """Drop a template-written BOS at the start of `text` when the tokenizer adds its own."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and adds_bos(tokenizer):
        return text[len(bos) :]
    return text


def turn_end_token_id(processor: Any) -> int:
    """The token the chat template closes an assistant turn with; the tokenizer's eos where the
    template writes none (e.g. PaliGemma, trained on `suffix + <eos>`)."""
    tok = processor.tokenizer
    marker = "cwdpo-turn-end-probe"
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": marker}]},
    ]
    try:
        text = render_prompt(processor, msgs)
    except Exception:
        text = ""
    if marker in text:
        tail = text.split(marker, 1)[1]
        special = set(tok.all_special_ids) | {
            i for i, t in tok.added_tokens_decoder.items() if getattr(t, "special", False)
        }
        for i in tok(tail, add_special_tokens=False)["input_ids"]:
            if i in special:
                return int(i)
            if tok.decode([i]).strip():
                break  # plain text after the response: the template writes no end token
    if tok.eos_token_id is None:
        raise ProcessorLoadError(
            "the tokenizer has no eos_token and the chat template closes "
            "an assistant turn with no special token"
        )
    return int(tok.eos_token_id)
