"""A model's self-checks before a long preference run: labels, BOS, log-probs against an
independent per-row HF forward, label leaks, the fast paths, generation stops and LoRA targets.

The family-matrix checks of tests/test_families.py, runnable on any checkpoint and a few rows
of the user's data: `python -m cwdpo.doctor` (`cwdpo.run.doctor.run_doctor`) runs them all.
Each check returns a `Check` (pass / fail / skip, the number behind it).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cwdpo.batch import IGNORE_INDEX
from cwdpo.model.backbone import VLMBackbone
from cwdpo.model.loading import module_group
from cwdpo.utils.modes import eval_mode

log = logging.getLogger(__name__)


@dataclass
class Check:
    name: str
    status: str  # "pass" | "fail" | "skip"
    value: str
    detail: str = ""


@dataclass
class Rows:
    """A few preference rows: images[i] is one image or a list of images."""

    images: list[Any]
    prompts: list[str]
    chosen: list[str]
    rejected: list[str]


# ------------------------------------------------------------------------------ references
def end_token_text(bb: VLMBackbone) -> str:
    """What the chat template writes right after an assistant reply: render a two-turn
    conversation and read the special token that follows the reply (the tokenizer's eos for a
    template without assistant turns, e.g. PaliGemma, trained on `suffix + <eos>`)."""
    tok = bb.tokenizer
    reply = "zz-reply-zz"
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": reply}]},
    ]
    text = tok.apply_chat_template(msgs, chat_template=bb.processor.chat_template, tokenize=False)
    if reply not in text:
        return tok.eos_token
    tail = text.split(reply, 1)[1]
    specials = sorted(
        {t.content for t in tok.added_tokens_decoder.values()} | {tok.eos_token},
        key=len,
        reverse=True,
    )
    return next((s for s in specials if tail.startswith(s)), tok.eos_token)


def reference_token_logps(
    bb: VLMBackbone, images: Any, prompt: str, response: str
) -> tuple[torch.Tensor, list[int]]:
    """Independent per-row log-probs of response + turn end: the family's own processor on the
    full text, one unpadded HF forward, no cwdpo collation."""
    proc, model = bb.processor, bb.model
    ims = list(images) if isinstance(images, list | tuple) else [images]
    text = bb.prompt_text(prompt) if len(ims) == 1 else bb.prompt_text(prompt, len(ims))
    if model.config.model_type == "paligemma":  # prefix-LM inputs come from suffix=
        enc = proc(images=[ims], text=[text], suffix=[response], return_tensors="pt")
    else:
        enc = proc(images=[ims], text=[text + response + end_token_text(bb)], return_tensors="pt")
    dev = bb.device
    enc = {k: v.to(dev) for k, v in enc.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**enc).logits[0].float()
    ids = enc["input_ids"][0]
    n = len(bb.tokenizer(response, add_special_tokens=False)["input_ids"]) + 1
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None])[:, 0]
    return lp[-n:].cpu(), ids[-n:].tolist()


def row_token_logps(bb: VLMBackbone, batch: dict, i: int) -> tuple[torch.Tensor, list[int]]:
    """Row i's response log-probs from cwdpo's batched path, and its label ids."""
    with torch.no_grad():
        lp = bb.logps(_to(batch, bb.device))
    m = lp.mask[i].bool()
    labels = batch["labels"][i]
    return lp.token[i][m].float().cpu(), labels[labels != IGNORE_INDEX].tolist()


def _to(batch: dict, dev: torch.device) -> dict:
    return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------ checks
def check_labels(bb: VLMBackbone, rows: Rows) -> Check:
    batch = bb.collate(rows.images, rows.prompts, rows.chosen)
    end, tok, bad = end_token_text(bb), bb.tokenizer, []
    for i, resp in enumerate(rows.chosen):
        lab = batch["labels"][i]
        ids = lab[lab != IGNORE_INDEX].tolist()
        last = tok.convert_ids_to_tokens(ids[-1])
        if last != end or tok.decode(ids[:-1]) != resp:
            bad.append(f"row {i}: labels decode to {tok.decode(ids)!r}, expected {resp + end!r}")
    return Check(
        "labels = response + turn end",
        "fail" if bad else "pass",
        f"{len(rows.chosen) - len(bad)}/{len(rows.chosen)} rows, turn end {end!r}",
        "; ".join(bad),
    )


def check_bos(bb: VLMBackbone, rows: Rows) -> Check:
    tok = bb.tokenizer
    if tok.bos_token_id is None:
        return Check("one BOS", "skip", "the tokenizer has no BOS")
    batch = bb.collate(rows.images, rows.prompts, rows.chosen)
    counts = [
        int((r[m.bool()] == tok.bos_token_id).sum())
        for r, m in zip(batch["input_ids"], batch["attention_mask"])
    ]
    return Check("one BOS", "pass" if max(counts) <= 1 else "fail", f"BOS per row {counts}")


def check_logps(bb: VLMBackbone, rows: Rows, tol: float) -> Check:
    batch = bb.collate_pairs(rows.images, rows.prompts, rows.chosen, rows.rejected)
    worst, bad = 0.0, []
    texts = list(rows.chosen) + list(rows.rejected)
    for i, (im, p, r) in enumerate(zip(list(rows.images) * 2, list(rows.prompts) * 2, texts)):
        ours, ids = row_token_logps(bb, batch, i)
        ref, ref_ids = reference_token_logps(bb, im, p, r)
        if ids != ref_ids:
            bad.append(f"row {i}: label ids differ from the processor's tokens of the full text")
            continue
        worst = max(worst, (ours - ref).abs().max().item())
    ok = not bad and worst <= tol
    return Check(
        "log-probs vs per-row HF forward",
        "pass" if ok else "fail",
        f"max |Δ| {worst:.2e} (tol {tol:.0e})",
        "; ".join(bad),
    )


def check_leak(bb: VLMBackbone, rows: Rows, tol: float) -> Check:
    worst = 0.0
    for n in sorted({1, len(rows.prompts)}):
        batch = bb.collate(rows.images[:n], rows.prompts[:n], rows.chosen[:n])
        pos = (batch["labels"][0] != IGNORE_INDEX).nonzero()[:, 0]
        if len(pos) < 3:
            continue
        last = int(pos[-2])
        changed = {k: v.clone() for k, v in batch.items()}
        new = (int(batch["input_ids"][0, last]) + 7) % len(bb.tokenizer)
        changed["input_ids"][0, last] = new
        changed["labels"][0, last] = new
        with torch.no_grad():
            a, b = bb.logps(_to(batch, bb.device)), bb.logps(_to(changed, bb.device))
        k = int(a.mask[0].nonzero()[:, 0][-2])  # log-prob index of the changed token
        worst = max(worst, (a.token[0, :k] - b.token[0, :k]).abs().max().item())
    return Check(
        "no label leak (later token → earlier log-prob)",
        "pass" if worst <= tol else "fail",
        f"max |Δ| {worst:.2e} (tol {tol:.0e})",
    )


def check_fast_paths(bb: VLMBackbone, rows: Rows, tol: float) -> list[Check]:
    """Prefix sharing and the reference cache against the plain reference log-probs."""
    from cwdpo.model.prefix import supports_prefix_sharing
    from cwdpo.model.ref_cache import RefLogpCache, cached_reference_logps, reference_fingerprint

    batch = _to(bb.collate_pairs(rows.images, rows.prompts, rows.chosen, rows.rejected), bb.device)
    n = len(rows.prompts)
    if not bb.has_reference:
        bb.snapshot_reference()
    with torch.no_grad():
        plain = bb.logps(batch, reference=True).sum.float().cpu()
        if supports_prefix_sharing(bb.model, batch):
            shared = bb.pair_logps(batch, n, reference=True, prefix_sharing=True).sum.float().cpu()
            d = (shared - plain).abs().max().item()
            pre = Check(
                "prefix sharing = plain", "pass" if d <= tol else "fail", f"max |Δ| {d:.2e}"
            )
        else:
            pre = Check("prefix sharing = plain", "skip", "falls back to the plain path here")
        with tempfile.TemporaryDirectory() as tmp:
            cache = RefLogpCache(tmp).bind(reference_fingerprint(bb))
            first = cached_reference_logps(bb, cache, batch, n).float().cpu()
            again = cached_reference_logps(bb, cache, batch, n).float().cpu()
            d = max((first - plain).abs().max().item(), (again - plain).abs().max().item())
            hits = cache.hits
    ok = d <= tol and hits == n
    return [
        pre,
        Check(
            "reference cache = plain",
            "pass" if ok else "fail",
            f"max |Δ| {d:.2e}, {hits}/{n} hits on the second pass",
        ),
    ]


def check_generation(bb: VLMBackbone, rows: Rows, max_new_tokens: int = 6) -> list[Check]:
    batched = bb.generate(rows.images, rows.prompts, max_new_tokens=max_new_tokens)
    single = [
        bb.generate([im], [p], max_new_tokens=max_new_tokens)[0]
        for im, p in zip(rows.images, rows.prompts)
    ]
    same = Check(
        "batched generation = per-row",
        "pass" if batched == single else "fail",
        f"{sum(a == b for a, b in zip(batched, single))}/{len(single)} rows equal",
        "" if batched == single else f"batched {batched!r} vs per-row {single!r}",
    )
    end = bb.tokenizer.convert_tokens_to_ids(end_token_text(bb))

    def force_end(module, args, out):  # the LM head: the turn-end token wins everywhere
        out = out.clone()
        out[..., end] = out.abs().amax() + 1e3
        return out

    seen: dict[str, Any] = {}
    real = bb.model.generate

    def spy(*a, **kw):
        seen["prompt"] = kw["input_ids"].shape[1]
        seen["out"] = out = real(*a, **kw)
        return out

    hook = bb.model.get_output_embeddings().register_forward_hook(force_end)
    bb.model.generate = spy
    try:
        bb.generate(rows.images[:2], rows.prompts[:2], max_new_tokens=max_new_tokens)
    finally:
        hook.remove()
        del bb.model.generate
    new = seen["out"][:, seen["prompt"] :]
    ok = new.shape[1] == 1 and bool((new == end).all())
    stop = Check(
        "generation stops at the turn end",
        "pass" if ok else "fail",
        f"{new.shape[1]} new token(s) after a forced {end_token_text(bb)!r}",
    )
    return [same, stop]


def check_lora(bb: VLMBackbone) -> Check:
    if bb.lora is None:
        return Check("LoRA targets found", "skip", "full fine-tuning (model.lora=null)")
    wrapped = [n for n, m in bb.model.named_modules() if hasattr(m, "lora_A")]
    groups: dict[str, int] = {}
    for n in wrapped:
        groups[module_group(n)] = groups.get(module_group(n), 0) + 1
    frozen_hit = sorted(set(groups) & set(bb.frozen))
    ok = bool(wrapped) and not frozen_hit
    return Check(
        "LoRA targets found",
        "pass" if ok else "fail",
        f"{len(wrapped)} modules: {groups}",
        f"adapters on frozen {frozen_hit}" if frozen_hit else "",
    )


def run_checks(
    bb: VLMBackbone, rows: Rows, tol: float, leak_tol: float | None = None
) -> list[Check]:
    """Every check on `rows` (2+ rows of different lengths exercise padding)."""
    out: list[Check] = []
    steps = [
        ("labels", lambda: [check_labels(bb, rows)]),
        ("one BOS", lambda: [check_bos(bb, rows)]),
        ("log-probs", lambda: [check_logps(bb, rows, tol)]),
        ("label leak", lambda: [check_leak(bb, rows, tol if leak_tol is None else leak_tol)]),
        ("generation", lambda: check_generation(bb, rows)),
        ("LoRA", lambda: [check_lora(bb)]),
        ("fast paths", lambda: check_fast_paths(bb, rows, tol)),
    ]
    with eval_mode(bb.model):
        for name, step in steps:
            try:
                out += step()
            except Exception as e:  # a check that crashes is a failed check, named
                out.append(Check(name, "fail", type(e).__name__, str(e)[:300]))
                log.exception("doctor check %r crashed", name)
    return out


def table(checks: Sequence[Check]) -> str:
    lines = ["| check | result | value | detail |", "|---|---|---|---|"]
    lines += [f"| {c.name} | {c.status.upper()} | {c.value} | {c.detail} |" for c in checks]
    return "\n".join(lines) + "\n"


def default_tolerance(bb: VLMBackbone) -> float:
    """fp32: exact up to rounding; bf16/fp16: padding changes the reduction order."""
    dtype = next(bb.model.parameters()).dtype
    return 1e-4 if dtype == torch.float32 else 5e-2
