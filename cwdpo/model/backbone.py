"""One wrapper over any HF image-text-to-text model + processor.

It owns everything model-specific so that stages and objectives never see a tokenizer:
chat-template prompts, response-only label masks, chosen + rejected log-probs in one
forward, batched generation, optional LoRA (peft) and the reference policy (a frozen copy,
or — with LoRA — the same weights with adapters disabled, so no second model in memory).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from cwdpo.batch import PER_TOKEN_KEYS, TEXT_KEYS
from cwdpo.errors import DataError, OverBudget
from cwdpo.model.collation import check_pair_columns, prompt_parts, repeat_pairs, text_rows
from cwdpo.model.loading import (
    LoRASettings,
    add_lora,
    disable_dropout_,
    freeze_groups,
    load_model_and_processor,
    lora_settings,
)
from cwdpo.model.logprobs import LogProbs
from cwdpo.model.processing import render_prompt, strip_duplicate_bos, turn_end_token_id
from cwdpo.model.sampling import sample_ids
from cwdpo.model.truncation import TruncationStats, check_pair_labels, check_policy
from cwdpo.utils.modes import eval_mode

ImageInput = Image.Image | Sequence[Image.Image]


class VLMBackbone(LogProbs, nn.Module):
    """Policy (and reference) VLM with the batching logic DPO-style training needs."""

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        max_length: int = 256,
        lora: LoRASettings | Mapping | None = None,
        gradient_checkpointing: bool = False,
        freeze_vision: bool = False,
        freeze_projector: bool = False,
        truncation: str = "error",
    ) -> None:
        super().__init__()
        self.truncation = check_policy(truncation)  # cwdpo.model.truncation
        self.truncation_stats = TruncationStats()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_length = max_length
        self.lora = lora = lora_settings(lora)
        self.frozen = tuple(
            g for g, on in (("vision", freeze_vision), ("projector", freeze_projector)) if on
        )
        self.model_type = str(getattr(model.config, "model_type", ""))
        self.turn_end_id = turn_end_token_id(processor)
        accepted = inspect.signature(model.forward).parameters
        self.per_token_keys = tuple(k for k in PER_TOKEN_KEYS if k in accepted)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        if lora is not None:
            model = add_lora(model, lora, self.frozen)
        else:
            freeze_groups(model, self.frozen)
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
        lora: LoRASettings | Mapping | None = None,
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
        chat_template: str | None = None,
        freeze_vision: bool = False,
        freeze_projector: bool = False,
        processor_kwargs: Mapping[str, Any] | None = None,
        truncation: str = "error",
    ) -> VLMBackbone:
        """`model.*` of the config: `lora` null / a mapping (short forms keep the defaults of
        LoRASettings; target_modules may be a LORA_PRESETS name), `freeze_vision` /
        `freeze_projector` keep those parts fixed, `processor_kwargs` override processor
        settings (Qwen's min_pixels/max_pixels)."""
        from omegaconf import OmegaConf

        if OmegaConf.is_config(processor_kwargs):  # nested DictConfigs confuse processors
            processor_kwargs = OmegaConf.to_container(processor_kwargs, resolve=True)
        model, processor = load_model_and_processor(
            path, dtype, trust_remote_code, attn_implementation, chat_template, processor_kwargs
        )
        return cls(
            model,
            processor,
            max_length,
            lora,
            gradient_checkpointing,
            freeze_vision=freeze_vision,
            freeze_projector=freeze_projector,
            truncation=truncation,
        )

    def disable_dropout(self) -> int:
        """Dropout off in the policy (`cwdpo.model.loading.disable_dropout_`): CW-DPO's π_ref runs
        in eval mode, so a noisy train-mode policy would give nonzero log-ratios at step 0."""
        return disable_dropout_(self.model)

    # ------------------------------------------------------------------ reference policy
    def snapshot_reference(self) -> None:
        """π_ref ← π_θ. Full fine-tuning: a frozen copy. LoRA: merge the adapters into the
        base and start fresh ones, so "adapters disabled" *is* the snapshot (no second model)."""
        if self.lora is not None:
            merged = self.model.merge_and_unload()
            self.model = add_lora(merged, self.lora, self.frozen)
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
    def prompt_parts(
        self, prompt: str, n_images: int = 1
    ) -> tuple[list[dict[str, Any]], list[int]]:
        """User-turn content parts and the order in which the images fill them
        (`cwdpo.model.collation.prompt_parts`)."""
        return prompt_parts(prompt, n_images)

    def prompt_text(self, prompt: str, n_images: int = 1) -> str:
        """The chat-templated user turn + generation prompt, with exactly one BOS."""
        parts, _ = self.prompt_parts(prompt, n_images)
        text = render_prompt(
            self.processor, [{"role": "user", "content": parts}], add_generation_prompt=True
        )
        return strip_duplicate_bos(text, self.tokenizer)

    def response_ids(self, response: str) -> list[int]:
        """Response tokens + the token the chat template closes an assistant turn with."""
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        return list(ids) + [self.turn_end_id]

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation stops on the generation config's eos ids and on the turn-end token."""
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if not ids and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return list(dict.fromkeys([*ids, self.turn_end_id]))

    def _processor_inputs(
        self, images: Sequence[ImageInput], prompts: Sequence[str]
    ) -> tuple[list[list[Image.Image]], list[str]]:
        """Images as one list per sample (ordered as the prompt places them) + prompt texts."""
        per_sample, texts = [], []
        for i, (im, p) in enumerate(zip(images, prompts)):
            ims = list(im) if isinstance(im, list | tuple) else [im]
            if not ims:
                raise DataError(f"batch row {i} (prompt {p[:60]!r}) has no image")
            _, order = self.prompt_parts(p, len(ims))
            per_sample.append([ims[k] for k in order])
            texts.append(self.prompt_text(p, len(ims)))
        return per_sample, texts

    def prompt_ids(self, images: Sequence[ImageInput], prompts: Sequence[str]) -> list[list[int]]:
        """The prompt tokens of each row (image tokens included), as `collate` lays them out."""
        return self._encode(images, prompts)[0]

    def _encode(self, images: Sequence[ImageInput], prompts: Sequence[str]):
        """Prompt ids per row (unpadded), per-token inputs per row, vision inputs."""
        per_sample, texts = self._processor_inputs(images, prompts)
        enc = self.processor(images=per_sample, text=texts, return_tensors="pt", padding=True)
        keep = [m.bool() for m in enc["attention_mask"]]
        ids = [row[m].tolist() for row, m in zip(enc["input_ids"], keep)]
        per_token = {
            k: [row[m].tolist() for row, m in zip(enc[k], keep)]
            for k in self.per_token_keys
            if k in enc
        }
        vision = {k: v for k, v in enc.items() if k not in TEXT_KEYS + PER_TOKEN_KEYS}
        return ids, per_token, vision

    def collate(
        self,
        images: Sequence[ImageInput],
        prompts: Sequence[str],
        responses: Sequence[str],
    ) -> dict[str, torch.Tensor]:
        """Tokenize prompt (with image tokens) + response + turn-end token; labels only on the
        response and its turn-end token. `images[i]` is one image or a list of images.

        A row longer than max_length is handled by `model.truncation`
        (`cwdpo.model.truncation`): an error (default), a counted cut of the *response* only
        (never image or prompt tokens), or `OverBudget` for the data module to drop it. A
        prompt that alone fills max_length is an error. Per-token inputs (token_type_ids,
        mm_token_type_ids) cover the whole row, prompt and response.
        """
        if not (len(images) == len(prompts) == len(responses)):
            raise ValueError("images, prompts and responses must have the same length")
        prompt_ids, per_token, vision = self._encode(images, prompts)
        return {**text_rows(self, prompt_ids, per_token, prompts, responses), **vision}

    def collate_pairs(
        self,
        images: Sequence[ImageInput],
        prompts: Sequence[str],
        chosen: Sequence[str],
        rejected: Sequence[str],
    ) -> dict[str, torch.Tensor]:
        """n preference pairs → 2n rows, the n chosen rows then the n rejected rows (row n+i is
        pair i's rejected response): one forward serves both. Each pair's image(s) + prompt go
        through the processor once (TRL's collator shape: prompt once, chosen and rejected
        ids); both rows get those prompt ids and vision inputs (`collation.repeat_pairs`), and
        the shared-prefix path (`cwdpo.model.prefix`) folds a pair back into one row.

        - `input_ids` [2n, T]: prompt (image tokens, prompt text, chat template) + response +
          turn-end token, right-padded with the pad id; rows i and n+i share the prompt;
        - `attention_mask` [2n, T]: 1 on real tokens; `labels` [2n, T]: the response and its
          turn-end token, IGNORE_INDEX (-100) on image, prompt and padding (unshifted);
        - per-token keys (token_type_ids, mm_token_type_ids) [2n, T] where the family has them;
        - vision keys as the processor lays them out for the 2n rows (per row, image or patch
          along dim 0: Qwen's pixel_values + image_grid_thw, Idefics3's pixel_attention_mask,
          LLaVA-NeXT's image_sizes), the rejected half a copy of the chosen half.

        On the embedded tiny LLaVA (`5` <|user|>, 64 image tokens `4`, `3` <|end|>, `6`
        <|assistant|>, pad `0`; pinned by tests/test_collate_pairs.py):

        >>> bb.collate_pairs([red_32x32, blue_48x32], ["Describe.", "Colour?"],
        ...                  ["a red square", "blue"], ["a blue circle", "a green circle"])
        {'input_ids': tensor([[5, 4, …, 4, 440, 21, 3, 6,  72, 337, 291, 3,   0,   0, 0, 0],
                              [5, 4, …, 4, 42, 86, 83, 86, 318, 38, 3, 6, 485,   3, 0, 0],
                              [5, 4, …, 4, 440, 21, 3, 6,  72, 322, 300, 3,   0,   0, 0, 0],
                              [5, 4, …, 4, 42, 86, 83, 86, 318, 38, 3, 6,  72, 335, 300, 3]]),
         'attention_mask': tensor([[1, …, 1, 0, 0, 0, 0], [1, …, 1, 0, 0],
                                   [1, …, 1, 0, 0, 0, 0], [1, …, 1]]),
         'labels': tensor([[-100, …, -100, 72, 337, 291, 3, -100, -100, -100, -100],
                           [-100, …, -100, 485, 3, -100, -100],
                           [-100, …, -100, 72, 322, 300, 3, -100, -100, -100, -100],
                           [-100, …, -100, 72, 335, 300, 3]]),
         'pixel_values': tensor(…)}  # [4, 3, 32, 32]: red, blue, red, blue; a red image is
                                     # (1, -1, -1) on every pixel (CLIP, mean = std = 0.5)
        """
        check_pair_columns(images, prompts, chosen, rejected)
        n = len(chosen)
        prompt_ids, per_token, vision = self._encode(images, prompts)  # once per pair
        twice = {k: v * 2 for k, v in per_token.items()}
        try:
            text = text_rows(self, prompt_ids * 2, twice, list(prompts) * 2, [*chosen, *rejected])
        except OverBudget as e:  # rows → the pairs they belong to
            raise OverBudget(str(e), sorted({i % n for i in e.rows})) from None
        check_pair_labels(
            text["labels"],
            n,
            lambda i: f"preference pair {i} of the batch (prompt {prompts[i]!r})",
        )
        return {**text, **repeat_pairs(vision)}

    # ------------------------------------------------------------------ generation
    def generation_inputs(
        self, images: Sequence[ImageInput], prompts: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Left-padded image + prompt rows on the model's device, as `generate` feeds them."""
        per_sample, texts = self._processor_inputs(images, prompts)
        old = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.processor(images=per_sample, text=texts, return_tensors="pt", padding=True)
        finally:
            self.tokenizer.padding_side = old
        drop = set(PER_TOKEN_KEYS) - set(self.per_token_keys) | {"labels"}
        return {k: v.to(self.device) for k, v in enc.items() if k not in drop}

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[ImageInput],
        prompts: Sequence[str],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        num_return_sequences: int = 1,
        shared_prefill: bool = True,
    ) -> list[str]:
        """Batched generation with KV cache (left padding). Returns n·B strings, row-major.
        n > 1 with `shared_prefill`: image + prompt prefilled once per record (model.sampling)."""
        enc = self.generation_inputs(images, prompts)
        with eval_mode(self.model):
            kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
            kw.update(
                use_cache=True,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.stop_token_ids,
            )
            if do_sample:
                kw.update(temperature=temperature, top_p=top_p, top_k=0)
            out = sample_ids(self.model, enc, num_return_sequences, shared_prefill, **kw)
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
