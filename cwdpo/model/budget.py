"""What a row costs in tokens, known before any batch is built (cwdpo.run.token_budget).

Why: a prompt longer than `model.max_length`, a literal image placeholder in the prompt text or an
image the family's processor refuses (Qwen2-VL: aspect ratio > 200) used to surface at collate
time, mid-training, as "batch row 0" or a raw transformers error (issue 24). Counting every row
with the processor itself is too slow at real scale (113k COCO images), but a VLM processor's
token count depends on the image *sizes* and the prompt only, not on the pixels: `TokenCounter`
runs the family's own processor on blank images of those sizes, once per (sizes, prompt), and
caches the count (tests/test_token_budget.py checks it equal to the count on the real images for
every family in cwdpo.model.families).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

#: What a prompt may not contain besides the family's own image tokens: LLaVA / RLAIF-V style
#: data writes "<image>" where the image goes, which cwdpo does itself (`<image k>` places image k).
GENERIC_PLACEHOLDERS = ("<image>",)
_IMAGE_WORDS = ("image", "vision", "video", "img")
#: Tokens a conf/model entry's max_length keeps for the response beyond its largest prompt.
RESPONSE_RESERVE = 128
#: Image sizes (width, height) the conf/model budget rule is checked on: phone photos both ways,
#: COCO-sized, panoramas, squares (the largest token count over these is the entry's budget).
PROBE_SIZES = (
    (640, 480),
    (480, 640),
    (1024, 768),
    (1280, 960),
    (1344, 1344),
    (1920, 1080),
    (1080, 1920),
    (2048, 2048),
    (3000, 1000),
    (4032, 3024),
    (3024, 4032),
)

Sizes = tuple[tuple[int, int], ...]


def position_limit(model: Any) -> int | None:
    """The most positions the language model was built for (`max_position_embeddings` of the text
    config, else of the config itself); None when the family does not say."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for c in (text, cfg):
        v = getattr(c, "max_position_embeddings", None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def image_placeholders(processor: Any) -> tuple[str, ...]:
    """The strings that mean "an image goes here" to this processor (its image / vision / video
    special tokens) plus the generic "<image>", longest first."""
    tok = processor.tokenizer
    found = set(GENERIC_PLACEHOLDERS)
    names = [a for a in dir(processor) if a.endswith("_token") and not a.startswith("_")]
    for a in names:
        v = getattr(processor, a, None)
        if isinstance(v, str) and v:
            found.add(v)
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    found.update(str(getattr(t, "content", t)) for t in added.values())
    found.update(getattr(tok, "all_special_tokens", []) or [])
    keep = {t for t in found if any(w in t.lower() for w in _IMAGE_WORDS)}
    return tuple(sorted(keep, key=lambda t: (-len(t), t)))


class TokenCounter:
    """Token counts of a `VLMBackbone`'s rows: prompts (chat template + the family's image
    tokens) cached per (image sizes, prompt), responses (+ the turn-end token) per text."""

    def __init__(self, backbone: Any) -> None:
        self.backbone = backbone
        self.placeholders = image_placeholders(backbone.processor)
        self._prompts: dict[tuple[Sizes, str], int | str] = {}
        self._responses: dict[str, int] = {}

    def placeholder_in(self, prompt: str) -> str | None:
        """The first image placeholder `prompt` contains (None: none)."""
        return next((t for t in self.placeholders if t in prompt), None)

    def prompt(self, sizes: Sizes, prompt: str) -> int | str:
        """Prompt tokens of a row with images of `sizes`, or why the processor refuses the row
        (its exception, one line)."""
        key = (tuple(sizes), prompt)
        if key not in self._prompts:
            blanks = [Image.new("RGB", s) for s in sizes]
            try:
                ids = self.backbone.prompt_ids(
                    [blanks[0] if len(blanks) == 1 else blanks], [prompt]
                )
                self._prompts[key] = len(ids[0])
            except (AttributeError, NameError):  # our bug, not the processor refusing the row
                raise
            except Exception as e:  # what the processor raises, it raises on the real image too
                self._prompts[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        return self._prompts[key]

    def responses(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each response as collate builds it (its ids + the turn-end token)."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._responses]
        if todo:
            ids = self.backbone.tokenizer(todo, add_special_tokens=False)["input_ids"]
            self._responses.update((t, len(i) + 1) for t, i in zip(todo, ids))
        return [self._responses[t] for t in texts]

    def largest_prompt(self, prompt: str, sizes: Sequence[tuple[int, int]] = PROBE_SIZES) -> int:
        """The most tokens a one-image row with `prompt` costs over `sizes` (the conf/model
        budget rule: max_length >= this + RESPONSE_RESERVE)."""
        counts = [self.prompt(((w, h),), prompt) for w, h in sizes]
        bad = [c for c in counts if isinstance(c, str)]
        if bad:
            raise ValueError(f"the processor refuses a probe image size: {bad[0]}")
        return max(int(c) for c in counts)
