"""One wrapper over any HF image-text-to-text model + processor.

It owns everything model-specific so that stages and objectives never see a tokenizer:
chat-template prompts, response-only label masks, chosen + rejected log-probs in one
forward, batched generation, optional LoRA (peft) and the reference policy (a frozen copy,
or — with LoRA — the same weights with adapters disabled, so no second model in memory).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from cwdpo.data.records import DataError
from cwdpo.objectives import IGNORE_INDEX, TEXT_KEYS, SeqLogps, sequence_logps

DROP_KEYS = ("token_type_ids",)


class ModelLoadError(RuntimeError):
    """A model directory / hub id that cannot be used (names the path and what is missing)."""


@dataclass
class LoRASettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Sequence[str] | str = "all-linear"


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


def load_model_and_processor(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    chat_template: str | None = None,
) -> tuple[nn.Module, Any]:
    """Load through AutoModelForImageTextToText / AutoProcessor, with errors that name the path."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    p = Path(str(path))
    if not p.exists():
        if p.is_absolute() or str(path).startswith(".") or not _in_hf_cache(str(path)):
            raise ModelLoadError(
                f"model path {path} is neither an existing directory nor a hub id in the local "
                "HF cache (set CWDPO_ALLOW_DOWNLOAD=1 to let transformers download a hub id)"
            )
    else:
        if p.is_dir() and not any(
            (p / f).is_file()
            for f in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
        ):
            raise ModelLoadError(
                f"model directory {p} has no processor (expected processor_config.json or "
                "preprocessor_config.json + tokenizer files saved with processor.save_pretrained)"
            )
    try:
        processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"cannot load a processor from {path}: {type(e).__name__}: {e}") from e
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


class VLMBackbone(nn.Module):
    """Policy (and reference) VLM with the batching logic DPO-style training needs."""

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        max_length: int = 256,
        lora: LoRASettings | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_length = max_length
        self.lora = lora
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        if lora is not None:
            model = self._add_lora(model, lora)
        self.model = model
        self.reference: nn.Module | None = None  # frozen copy when not using LoRA
        self.has_reference = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        max_length: int = 256,
        lora: LoRASettings | dict | None = None,
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
        chat_template: str | None = None,
    ) -> VLMBackbone:
        model, processor = load_model_and_processor(
            path, dtype, trust_remote_code, attn_implementation, chat_template
        )
        if isinstance(lora, dict):
            lora = LoRASettings(**lora)
        return cls(model, processor, max_length, lora, gradient_checkpointing)

    @staticmethod
    def _add_lora(model: nn.Module, s: LoRASettings) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        target = s.target_modules if isinstance(s.target_modules, str) else list(s.target_modules)
        cfg = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=target)
        return get_peft_model(model, cfg)

    # ------------------------------------------------------------------ reference policy
    def snapshot_reference(self) -> None:
        """π_ref ← π_θ. Full fine-tuning: a frozen copy. LoRA: merge the adapters into the
        base and start fresh ones, so "adapters disabled" *is* the snapshot (no second model)."""
        if self.lora is not None:
            merged = self.model.merge_and_unload()
            self.model = self._add_lora(merged, self.lora)
        else:
            ref = copy.deepcopy(self.model)
            ref.eval()
            ref.requires_grad_(False)
            self.reference = ref
        self.has_reference = True

    @contextmanager
    def _reference_ctx(self):
        if not self.has_reference:
            raise RuntimeError(
                "CW-DPO needs a reference policy: run stage 1 first or call snapshot_reference() "
                "(stage order sft_c → cw_dpo, or stage=cw_dpo with a checkpoint to start from)"
            )
        if self.lora is not None:
            with self.model.disable_adapter():
                yield self.model
        else:
            self.reference.eval()  # Lightning's .train() on the module reaches the copy too
            yield self.reference

    # ------------------------------------------------------------------ text
    def prompt_text(self, prompt: str) -> str:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def response_ids(self, response: str) -> list[int]:
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        return list(ids) + [self.tokenizer.eos_token_id]

    def _encode_prompts(self, images: Sequence[Image.Image], prompts: Sequence[str]):
        texts = [self.prompt_text(p) for p in prompts]
        enc = self.processor(images=list(images), text=texts, return_tensors="pt", padding=True)
        ids = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
        vision = {k: v for k, v in enc.items() if k not in TEXT_KEYS + DROP_KEYS}
        return ids, vision

    def collate(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        responses: Sequence[str],
    ) -> dict[str, torch.Tensor]:
        """Tokenize prompt (with image tokens) + response; labels only on the response.

        Truncation cuts the *response* only (never image or prompt tokens); a prompt that alone
        exceeds max_length is an error.
        """
        if not (len(images) == len(prompts) == len(responses)):
            raise ValueError("images, prompts and responses must have the same length")
        prompt_ids, vision = self._encode_prompts(images, prompts)
        rows, labels = [], []
        for i, (p, r) in enumerate(zip(prompt_ids, responses)):
            if not r or not r.strip():
                raise DataError(f"empty response text in batch row {i} (prompt {prompts[i]!r})")
            resp = self.response_ids(r)
            room = self.max_length - len(p)
            if room < 1:
                raise DataError(
                    f"prompt of batch row {i} has {len(p)} tokens (image tokens included), "
                    f"more than max_length={self.max_length}: raise model.max_length"
                )
            resp = resp[:room]
            rows.append(p + resp)
            labels.append([IGNORE_INDEX] * len(p) + resp)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (r, lb) in enumerate(zip(rows, labels)):
            input_ids[i, : len(r)] = torch.tensor(r)
            attention[i, : len(r)] = 1
            lab[i, : len(lb)] = torch.tensor(lb)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": lab, **vision}

    def collate_pairs(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        chosen: Sequence[str],
        rejected: Sequence[str],
    ) -> dict[str, torch.Tensor]:
        """Chosen rows first, rejected rows second: one forward serves both."""
        if len(chosen) != len(rejected):
            raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected responses")
        for i, (c, r) in enumerate(zip(chosen, rejected)):
            if " ".join(c.split()) == " ".join(r.split()):
                raise DataError(
                    f"preference pair {i} of the batch (prompt {prompts[i]!r}): chosen and "
                    f"rejected are identical ({c!r}); a pair needs two different responses"
                )
        return self.collate(
            list(images) * 2, list(prompts) * 2, list(chosen) + list(rejected)
        )

    # ------------------------------------------------------------------ log-probs
    def _logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Logits only from the first response position on (skips the LM head on image tokens)."""
        labels = batch["labels"]
        is_resp = labels != IGNORE_INDEX
        first = int(is_resp.float().argmax(-1).min().item()) if is_resp.any() else 1
        start = max(first - 1, 0)
        keep = labels.shape[1] - start
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs, logits_to_keep=keep, use_cache=False)
        return out.logits, start

    def logps(self, batch: dict[str, torch.Tensor], reference: bool = False) -> SeqLogps:
        """Per-sequence response log-probs under the policy (or the reference, no grad)."""
        ctx = self._reference_ctx() if reference else nullcontext(self.model)
        with ctx as model, torch.no_grad() if reference else nullcontext():
            logits, start = self._logits(model, batch)
        labels = batch["labels"][:, start + 1 :]
        return sequence_logps(logits[:, :-1], labels)

    def logps_and_logits(self, batch: dict[str, torch.Tensor]) -> tuple[SeqLogps, torch.Tensor, torch.Tensor]:
        """Policy log-probs plus the aligned (logits, labels) for smoothing / calibration."""
        logits, start = self._logits(self.model, batch)
        labels = batch["labels"][:, start + 1 :]
        logits = logits[:, :-1]
        return sequence_logps(logits, labels), logits, labels

    def pair_logps(
        self,
        batch: dict[str, torch.Tensor],
        n: int,
        reference: bool = False,
        prefix_sharing: bool = False,
    ) -> SeqLogps:
        """Log-probs of a `collate_pairs` batch (n pairs, 2n rows). prefix_sharing=True runs
        image + prompt once per pair (`cwdpo.prefix`) where the model supports it (else, and
        with gradient checkpointing in training mode, the plain `logps` path)."""
        if prefix_sharing:
            from cwdpo.prefix import shared_prefix_logps, supports_prefix_sharing

            ctx = self._reference_ctx() if reference else nullcontext(self.model)
            with ctx as model, torch.no_grad() if reference else nullcontext():
                if supports_prefix_sharing(model):
                    return shared_prefix_logps(model, batch, n)
        return self.logps(batch, reference=reference)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        num_return_sequences: int = 1,
    ) -> list[str]:
        """Batched generation with KV cache (left padding). Returns n·B strings, row-major."""
        texts = [self.prompt_text(p) for p in prompts]
        old = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.processor(images=list(images), text=texts, return_tensors="pt", padding=True)
        finally:
            self.tokenizer.padding_side = old
        enc = {k: v.to(self.device) for k, v in enc.items() if k not in DROP_KEYS}
        was_training = self.model.training
        self.model.eval()
        try:
            kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
            out = self.model.generate(
                **enc,
                **kwargs,
                num_return_sequences=num_return_sequences,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                use_cache=True,
            )
        finally:
            self.model.train(was_training)
        new = out[:, enc["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Save policy weights (merged if LoRA) + processor: loadable by from_pretrained."""
        model = self.model
        if self.lora is not None:
            model = copy.deepcopy(self.model).merge_and_unload()
        model.save_pretrained(out_dir, safe_serialization=True)
        self.processor.save_pretrained(out_dir)
