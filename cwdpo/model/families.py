"""Tiny random-weight builds of every supported open VLM family, offline.

The offline equivalent of the hub's ``tiny-random-*`` test models: for each family the *real*
transformers config, model, processor and (PIL) image-processor classes with tiny dims, a
byte-level BPE tokenizer trained on the ShapesWorld vocabulary that carries the family's own
special tokens (BOS handling, image placeholders, turn-end token), and a chat template shaped
like the released checkpoint's. Each build is saved with ``save_pretrained`` and loads back
through ``AutoModelForImageTextToText`` / ``AutoProcessor`` — the path a real checkpoint takes —
so the family test matrix (tests/test_families.py), ``cwdpo.doctor`` and ``cwdpo.bench --model``
exercise the same code a researcher's model does.

The builders live in ``cwdpo.model.builders`` (one module per model family; what they share,
``FamilySpec`` and ``family_tokenizer`` included, in ``builders/common.py``). Adding a family:
write a ``build_<name>(spec) -> (model, processor)`` there (start from the closest existing one:
copy its chat template from the real ``chat_template.jinja``, keep the real special tokens) and
register it in ``FAMILIES``; the test matrix picks it up.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cwdpo.model.builders.common import FamilySpec, family_tokenizer
from cwdpo.model.builders.gemma import build_gemma3, build_paligemma
from cwdpo.model.builders.idefics import build_idefics3, build_smolvlm
from cwdpo.model.builders.llava import build_llava_next, build_llava_onevision
from cwdpo.model.builders.qwen import build_qwen2_5_vl, build_qwen2_vl, build_qwen3_vl
from cwdpo.model.tiny import default_cache_dir
from cwdpo.utils.io import atomic_save_dir

__all__ = ["FAMILIES", "Family", "FamilySpec", "build_family", "ensure_family", "family_tokenizer"]

#: the sizes every cached tiny family build uses unless told otherwise
DEFAULT_SPEC = FamilySpec()


@dataclass(frozen=True)
class Family:
    """One registered family: its builder and what the test matrix should expect of it."""

    name: str
    build: Callable[[FamilySpec], tuple[Any, Any]]
    model_type: str
    multi_image: bool = True  # can one sample hold several images


def build_llava(spec: FamilySpec) -> tuple[Any, Any]:
    """LLaVA-1.5: the embedded tiny LLaVA (`cwdpo.model.tiny`, its own sizes; `spec.seed`),
    so the matrix's `llava` is the model every default run trains (`ensure_family` returns
    its cached directory)."""
    from cwdpo.model.tiny import TinySpec, tiny_vlm_parts

    return tiny_vlm_parts(TinySpec(seed=spec.seed))


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llava", build_llava, "llava"),
        Family("llava_next", build_llava_next, "llava_next"),
        Family("llava_onevision", build_llava_onevision, "llava_onevision"),
        Family("qwen2_vl", build_qwen2_vl, "qwen2_vl"),
        Family("qwen2_5_vl", build_qwen2_5_vl, "qwen2_5_vl"),
        Family("qwen3_vl", build_qwen3_vl, "qwen3_vl"),
        Family("idefics3", build_idefics3, "idefics3"),
        Family("smolvlm", build_smolvlm, "smolvlm"),
        Family("gemma3", build_gemma3, "gemma3"),
        Family("paligemma", build_paligemma, "paligemma"),
    )
}


def build_family(name: str, out_dir: str | Path, spec: FamilySpec = DEFAULT_SPEC) -> Path:
    """Build family `name` with random weights into `out_dir` (atomically: temp dir + swap)."""
    import torch

    if name not in FAMILIES:
        raise KeyError(f"unknown VLM family {name!r}; known: {sorted(FAMILIES)}")
    out_dir = Path(out_dir)
    torch.manual_seed(spec.seed)
    model, processor = FAMILIES[name].build(spec)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        meta = json.dumps({"family": name, **asdict(spec)}, indent=2)
        (tmp / "cwdpo_family.json").write_text(meta)

    return atomic_save_dir(out_dir, write)


def ensure_family(
    name: str, cache_dir: str | Path | None = None, spec: FamilySpec = DEFAULT_SPEC
) -> Path:
    """Path of the cached tiny build of family `name`, building it on first use (`llava`: the
    embedded tiny VLM's own cache entry, shared with every default run)."""
    if name == "llava":
        from cwdpo.model.tiny import TinySpec, ensure_tiny_vlm

        return ensure_tiny_vlm(cache_dir, TinySpec(seed=spec.seed))
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / f"tiny-{name}-{spec.key(name)}"
    if not (path / "cwdpo_family.json").is_file():
        build_family(name, path, spec)
    return path
