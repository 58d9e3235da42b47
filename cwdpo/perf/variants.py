"""What the bench times: our training step on each path, TRL's DPOTrainer step on the same pairs,
on-policy generation, and the CW-DPO objective alone.

Each training variant is a `Variant`: a closure doing one full step (loss, backward, AdamW step)
on one fixed batch, plus a reader of the bytes it holds between steps.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from cwdpo.batch import PairBatch, negative_flags
from cwdpo.perf.memory import state_bytes, sync


@dataclass
class Variant:
    name: str
    step: Callable[[], Any]
    group: str  # "ours" | "trl" | "lora"
    state: Callable[[], dict[str, int]] | None = None
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peak: int = 0
    total: int = 0


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def shapes_pairs(n: int, seed: int):
    """n ShapesWorld training pairs (the bench's one batch)."""
    from cwdpo.data.shapes import ShapesWorld

    pairs = ShapesWorld(seed=seed).pairs("train", n + 4)[:n]
    if len(pairs) < n:
        raise RuntimeError(f"ShapesWorld gave {len(pairs)} pairs, wanted {n}")
    return pairs


# ----------------------------------------------------------------------------- ours
def _our_batch(bb, pairs, device):
    images = [p.image.load() for p in pairs]
    enc = bb.collate_pairs(
        images, [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs]
    )
    neg_is_dataset, neg_is_easy = negative_flags([p.source for p in pairs])
    return PairBatch(
        inputs={k: v.to(device) for k, v in enc.items()},
        n=len(pairs),
        neg_is_dataset=neg_is_dataset.to(device),
        neg_is_easy=neg_is_easy.to(device),
    )


def _composition(bb, batch) -> dict[str, Any]:
    from cwdpo.batch import IGNORE_INDEX

    enc = batch.inputs
    image_id = getattr(bb.model.config, "image_token_id", None)
    if image_id is None:
        image_id = getattr(bb.model.config, "image_token_index", -1)
    real = enc["attention_mask"].bool()
    resp = enc["labels"] != IGNORE_INDEX
    img = (enc["input_ids"] == image_id) & real
    rows = real.shape[0]
    return {
        "rows": rows,
        "image_tokens_per_row": img.sum().item() / rows,
        "prompt_text_tokens_per_row": (real & ~resp & ~img).sum().item() / rows,
        "response_tokens_per_row": resp.sum().item() / rows,
        "padded_width": real.shape[1],
    }


def _our_backbone(args, path, device, lora: bool):
    """The backbone (reference snapshot taken, train mode) and one AdamW over its trainables."""
    from cwdpo.model.backbone import VLMBackbone
    from cwdpo.model.loading import LoRASettings

    torch.manual_seed(args.seed)
    settings = LoRASettings() if lora else None
    bb = VLMBackbone.from_pretrained(
        path,
        max_length=args.max_length,
        lora=settings,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    bb.model.to(device)
    bb.snapshot_reference()
    bb.model.train()
    params = [p for p in bb.model.parameters() if p.requires_grad]
    return bb, torch.optim.AdamW(params, lr=args.lr)


def _step_factory(args, bb, opt, batch, device) -> Callable[[bool, bool, bool], Callable[[], Any]]:
    """make(cooling, prefix, cache) -> one training step of a CWDPOModule on `batch`."""
    from cwdpo.model.ref_cache import RefLogpCache, reference_fingerprint
    from cwdpo.stages import CWDPOModule

    cache_dir = tempfile.mkdtemp(prefix="cwdpo-bench-refcache-")
    fp = reference_fingerprint(bb)

    def make(cooling: bool, prefix: bool, cache: bool) -> Callable[[], Any]:
        m = CWDPOModule(
            bb,
            optimizer=partial(torch.optim.AdamW, lr=args.lr),
            beta=0.1,
            cooling=cooling,
            prefix_sharing=prefix,
            ref_cache=RefLogpCache(cache_dir).bind(fp) if cache else None,
        )

        def step() -> None:
            with autocast(device, args.precision):
                loss, _ = m.compute(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)

        if cache:  # warm: the first epoch fills it (cost = one reference forward per pair)
            with torch.no_grad(), autocast(device, args.precision):
                m.compute(batch)
        return step

    return make


def our_variants(args, path, pairs, device, lora) -> tuple[list[Variant], dict[str, Any]]:
    """Our DPO and CW-DPO steps: on the plain / prefix / prefix+cache paths (full fine-tuning),
    or prefix+cache only with LoRA; and the batch's token composition."""
    bb, opt = _our_backbone(args, path, device, lora)
    batch = _our_batch(bb, pairs, device)
    info = _composition(bb, batch)
    make = _step_factory(args, bb, opt, batch, device)

    def state() -> dict[str, int]:
        return state_bytes(bb.model, bb.reference, opt)

    out = []
    if lora:
        for cooling, name in ((True, "cwdpo"), (False, "dpo")):
            out.append(
                Variant(f"lora/{name}/prefix+cache", make(cooling, True, True), "lora", state)
            )
        return out, info
    for path_name, prefix, cache in (
        ("plain", False, False),
        ("prefix", True, False),
        ("prefix+cache", True, True),
    ):
        for cooling, name in ((False, "dpo"), (True, "cwdpo")):
            out.append(Variant(f"{name}/{path_name}", make(cooling, prefix, cache), "ours", state))
    return out, info


# ----------------------------------------------------------------------------- TRL
def _trl_dataset(pairs):
    """The pairs as TRL's conversational vision dataset (one image per prompt)."""
    from datasets import Dataset

    def user(p):
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}]

    def assistant(t):
        return [{"role": "assistant", "content": [{"type": "text", "text": t}]}]

    return Dataset.from_dict(
        {
            "images": [[p.image.load()] for p in pairs],
            "prompt": [user(p.prompt) for p in pairs],
            "chosen": [assistant(p.chosen) for p in pairs],
            "rejected": [assistant(p.rejected) for p in pairs],
        }
    )


def _trl_config(args, pairs, device):
    """DPOConfig matching our step: all pairs in one batch, same lr, beta, precision, seed."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="cwdpo-bench-trl-"),
        per_device_train_batch_size=len(pairs),
        learning_rate=args.lr,
        beta=0.1,
        max_length=None,
        report_to="none",
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.precision == "bf16",
        use_cpu=device.type == "cpu",
        save_strategy="no",
        dataloader_num_workers=0,
        seed=args.seed,
        logging_steps=1,
    )


def trl_variant(args, path, pairs, device) -> tuple[Variant, dict[str, Any]]:
    """TRL's `DPOTrainer.training_step` + optimizer step on the same pairs, and its batch shape."""
    import trl
    from transformers import AutoModelForImageTextToText
    from trl import DPOTrainer

    from cwdpo.model.processing import load_processor

    torch.manual_seed(args.seed)
    model = AutoModelForImageTextToText.from_pretrained(path)
    ref = AutoModelForImageTextToText.from_pretrained(path)
    processor = load_processor(path)  # AutoProcessor, or without its video processor
    ds = _trl_dataset(pairs)
    cfg = _trl_config(args, pairs, device)
    trainer = DPOTrainer(
        model=model, ref_model=ref, args=cfg, train_dataset=ds, processing_class=processor
    )
    batch = next(iter(trainer.get_train_dataloader()))  # TRL's own collation (all pairs)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop otherwise

    def step() -> None:
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        sync(device)

    def state() -> dict[str, int]:
        return state_bytes(trainer.model, trainer.ref_model, trainer.optimizer)

    real = batch["attention_mask"].bool()
    info = {
        "version": trl.__version__,
        "rows": real.shape[0],
        "padded_width": real.shape[1],
        "completion_tokens_per_row": batch["completion_mask"].sum().item() / real.shape[0],
    }
    return Variant("trl/dpo", step, "trl", state), info


# ----------------------------------------------------------------------------- the rest
def generation(args, path, pairs, device) -> dict[str, Any]:
    """On-policy generation tokens/s (`VLMBackbone.generate`, sampling, as the refresh does)."""
    from cwdpo.model.backbone import VLMBackbone

    torch.manual_seed(args.seed)
    bb = VLMBackbone.from_pretrained(path, max_length=args.max_length)
    bb.model.to(device)
    images = [p.image.load() for p in pairs]
    prompts = [p.prompt for p in pairs]
    kw = {"max_new_tokens": args.gen_tokens, "do_sample": True, "num_return_sequences": 2}
    bb.generate(images[:2], prompts[:2], **kw)  # warm-up
    times, tokens = [], 0
    for _ in range(args.gen_rounds):
        sync(device)
        t = time.perf_counter()
        with autocast(device, args.precision):
            outs = bb.generate(images, prompts, **kw)
        sync(device)
        times.append(time.perf_counter() - t)
        # re-tokenized samples (+ EOS), capped at max_new_tokens
        tokens += sum(min(len(bb.response_ids(o)) if o else 1, args.gen_tokens) for o in outs)
    total = sum(times)
    return {
        "sequences_per_round": len(pairs) * 2,
        "max_new_tokens": args.gen_tokens,
        "tokens": tokens,
        "seconds": total,
        "tokens_per_s": tokens / total,
    }


def objective_overhead(n: int, reps: int = 500) -> dict[str, float]:
    """Noise-free view of the cooling cost: the objective alone, cooling on vs off."""
    from cwdpo.losses.objectives import cw_dpo_loss

    g = torch.Generator().manual_seed(0)
    x = [torch.randn(n, generator=g) * 50 for _ in range(4)]
    ell = torch.randn(n, generator=g) - 3
    best = {False: float("inf"), True: float("inf")}
    for _ in range(5):  # alternate, keep the fastest repeat of each (noise only adds time)
        for cooling in (False, True):
            t = time.process_time()
            for _ in range(reps):
                cw_dpo_loss(*x, ell, beta=0.1, cooling=cooling)
            best[cooling] = min(best[cooling], (time.process_time() - t) / reps)
    out = {"dpo": best[False], "cooling": best[True]}
    out["extra_us_per_step"] = (out["cooling"] - out["dpo"]) * 1e6
    return out
