"""The family matrix: every supported open VLM family, as a tiny random-weight build of its real
transformers classes (cwdpo.families), through every path cwdpo runs. Adding a family = one
entry in `cwdpo.families.FAMILIES`.

Numbers are checked against an independent reference: one HF forward per row, built by the
family's own processor on the full text (prompt + response + turn end), so the model applies its
own position and attention rules (Qwen M-RoPE from mm_token_type_ids, Gemma3 bidirectional image
spans, PaliGemma's prefix-LM via `suffix=`), with no padding and no cwdpo collation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cwdpo.backbone import VLMBackbone
from cwdpo.families import FAMILIES, ensure_family
from cwdpo.objectives import IGNORE_INDEX

NAMES = list(FAMILIES)
#: max |Δ log-prob| per family vs the per-row reference (written for the closing note when
#: CWDPO_FAMILY_REPORT names a file)
MEASURED: dict[str, dict[str, float]] = {}
TOL = 2e-5


@pytest.fixture(scope="session")
def family_dirs(tiny_cache_dir) -> dict[str, Path]:
    return {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    out = os.environ.get("CWDPO_FAMILY_REPORT")
    if out and MEASURED:
        Path(out).write_text(json.dumps(MEASURED, indent=2, sort_keys=True))


def family_path(name: str, family_dirs: dict[str, Path], cache: Path) -> Path:
    if name not in family_dirs:
        family_dirs[name] = ensure_family(name, cache)
    return family_dirs[name]


@pytest.fixture(params=NAMES)
def fam(request, family_dirs, tiny_cache_dir) -> tuple[str, Path]:
    return request.param, family_path(request.param, family_dirs, tiny_cache_dir)


def load(path: Path, **kw) -> VLMBackbone:
    torch.manual_seed(0)
    bb = VLMBackbone.from_pretrained(path, max_length=kw.pop("max_length", 384), **kw)
    bb.model.eval()
    return bb


@pytest.fixture(scope="module")
def rows():
    """Three ShapesWorld rows with different prompt and response lengths (padding exercised)."""
    from cwdpo.data.shapes import ShapesWorld

    ps = ShapesWorld().pairs("train", 3)
    prompts = [ps[0].prompt, "What is in the picture?", "Describe the shapes, left to right."]
    return [p.image.load() for p in ps], prompts, [p.chosen for p in ps], [p.rejected for p in ps]


def _end_token_text(bb: VLMBackbone) -> str:
    """What the chat template writes right after an assistant reply, found without cwdpo:
    render a two-turn conversation and read the special token that follows the reply."""
    tok = bb.tokenizer
    reply = "zz-reply-zz"
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": reply}]},
    ]
    text = tok.apply_chat_template(msgs, chat_template=bb.processor.chat_template, tokenize=False)
    if reply not in text:  # a template without assistant turns (PaliGemma): trained on <eos>
        return tok.eos_token
    tail = text.split(reply, 1)[1]
    specials = sorted(
        {t.content for t in tok.added_tokens_decoder.values()} | {tok.eos_token},
        key=len,
        reverse=True,
    )
    return next((s for s in specials if tail.startswith(s)), tok.eos_token)


def reference_token_logps(
    bb: VLMBackbone, images, prompt: str, response: str
) -> tuple[torch.Tensor, list[int]]:
    """Independent per-row log-probs of the response (+ turn end): the family's processor on
    the full text, one unpadded HF forward."""
    proc, model = bb.processor, bb.model
    ims = list(images) if isinstance(images, list) else [images]
    text = bb.prompt_text(prompt, len(ims))
    if (
        bb.model.config.model_type == "paligemma"
    ):  # its processor builds the prefix-LM inputs from suffix=
        enc = proc(images=[ims], text=[text], suffix=[response], return_tensors="pt")
    else:
        enc = proc(images=[ims], text=[text + response + _end_token_text(bb)], return_tensors="pt")
    enc = {k: v for k, v in enc.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**enc).logits[0].float()
    ids = enc["input_ids"][0]
    n = len(bb.tokenizer(response, add_special_tokens=False)["input_ids"]) + 1
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None])[:, 0]
    return lp[-n:], ids[-n:].tolist()


def row_token_logps(bb: VLMBackbone, batch: dict, i: int) -> tuple[torch.Tensor, list[int]]:
    with torch.no_grad():
        lp = bb.logps(batch)
    m = lp.mask[i].bool()
    labels = batch["labels"][i]
    return lp.token[i][m].float(), labels[labels != IGNORE_INDEX].tolist()


# ------------------------------------------------------------------------------------ load
def test_family_loads_through_auto_classes(fam):
    name, path = fam
    bb = load(path)
    assert bb.model.config.model_type == FAMILIES[name].model_type
    assert type(bb.model).__module__.startswith(f"transformers.models.{FAMILIES[name].model_type}")
    assert hasattr(bb.processor, "image_processor") and bb.processor.chat_template
    assert sum(p.numel() for p in bb.model.parameters()) < 1_000_000  # tiny: seconds per family


# ------------------------------------------------------------------------------------ collate
def test_collate_labels_are_the_response_and_its_turn_end(fam, rows):
    name, path = fam
    bb = load(path)
    images, prompts, chosen, _ = rows
    batch = bb.collate(images, prompts, chosen)
    end = _end_token_text(bb)
    tok = bb.tokenizer
    for i, resp in enumerate(chosen):
        lab = batch["labels"][i]
        ids = lab[lab != IGNORE_INDEX].tolist()
        assert tok.convert_ids_to_tokens(ids[-1]) == end, (name, tok.convert_ids_to_tokens(ids[-1]))
        assert tok.decode(ids[:-1]) == resp
        # labels are a contiguous block right after the prompt, inside the attention mask
        pos = (lab != IGNORE_INDEX).nonzero()[:, 0]
        assert pos.tolist() == list(range(int(pos[0]), int(pos[0]) + len(ids)))
        assert int(batch["attention_mask"][i].sum()) == int(pos[-1]) + 1
        row = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        if tok.bos_token_id is not None:
            assert int((row == tok.bos_token_id).sum()) <= 1, f"{name}: BOS twice"
        for k in bb.per_token_keys:  # prompt-width keys now span the whole row
            assert batch[k].shape == batch["input_ids"].shape, k


def test_exactly_one_bos_where_the_family_uses_one(fam, rows):
    name, path = fam
    bb = load(path)
    tok = bb.tokenizer
    images, prompts, chosen, _ = rows
    batch = bb.collate(images[:1], prompts[:1], chosen[:1])
    row = batch["input_ids"][0].tolist()
    template_writes = "bos_token" in bb.processor.chat_template or (
        tok.bos_token and tok.bos_token in bb.processor.chat_template
    )
    adds = tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]
    if name == "paligemma":  # its processor writes <image>… <bos> prompt \n
        adds = True
    expected = 1 if (template_writes or adds) else 0
    assert row.count(tok.bos_token_id) == expected if tok.bos_token_id is not None else True


def test_truncation_never_cuts_image_tokens(fam, rows):
    name, path = fam
    bb = load(path)
    images, prompts, chosen, _ = rows
    full = bb.collate(images[:1], prompts[:1], chosen[:1])
    plen = int((full["labels"][0] == IGNORE_INDEX).long().cumprod(0).sum())
    bb.max_length = plen + 2  # room for two response tokens only
    cut = bb.collate(images[:1], prompts[:1], chosen[:1])
    assert cut["input_ids"].shape[1] == plen + 2
    assert torch.equal(cut["input_ids"][0, :plen], full["input_ids"][0, :plen])
    with torch.no_grad():
        bb.logps(cut)  # the model accepts it: every image token is still there
    bb.max_length = plen - 1
    with pytest.raises(Exception, match="max_length"):
        bb.collate(images[:1], prompts[:1], chosen[:1])


# ------------------------------------------------------------------------------------ numbers
def test_batched_logps_equal_independent_per_row_forward(fam, rows):
    name, path = fam
    bb = load(path)
    images, prompts, chosen, rejected = rows
    batch = bb.collate_pairs(images, prompts, chosen, rejected)
    worst = 0.0
    for i, (im, p, r) in enumerate(zip(images * 2, prompts * 2, chosen + rejected)):
        ours, ids = row_token_logps(bb, batch, i)
        ref, ref_ids = reference_token_logps(bb, im, p, r)
        assert ids == ref_ids, f"{name} row {i}: label ids differ from the processor's"
        worst = max(worst, (ours - ref).abs().max().item())
    MEASURED.setdefault(name, {})["logps_vs_reference"] = worst
    assert worst < TOL, f"{name}: max |Δ log-prob| {worst:.2e} vs the per-row HF forward"


def test_no_label_leak_later_tokens_never_move_earlier_logps(fam, rows):
    name, path = fam
    bb = load(path)
    images, prompts, chosen, _ = rows
    for n in (1, 3):  # unpadded (the PaliGemma sdpa leak) and padded batches
        batch = bb.collate(images[:n], prompts[:n], chosen[:n])
        with torch.no_grad():
            base = bb.logps(batch)
        lab = batch["labels"][0]
        pos = (lab != IGNORE_INDEX).nonzero()[:, 0]
        last = int(pos[-2])  # the last response token before the turn end
        changed = {k: v.clone() for k, v in batch.items()}
        new = (int(batch["input_ids"][0, last]) + 7) % len(bb.tokenizer)
        changed["input_ids"][0, last] = new
        changed["labels"][0, last] = new
        with torch.no_grad():
            moved = bb.logps(changed)
        k = int(base.mask[0].nonzero()[:, 0][-2])  # log-prob index of that token
        delta = (base.token[0, :k] - moved.token[0, :k]).abs().max().item()
        MEASURED.setdefault(name, {})["leak_probe"] = max(
            MEASURED[name].get("leak_probe", 0.0), delta
        )
        assert delta == 0.0 or delta < 1e-6, (
            f"{name} (batch {n}): an earlier log-prob moved by {delta:.2e}"
        )
        assert (base.token[0, k] - moved.token[0, k]).abs() > 0  # the probe did change something


def test_batched_generation_equals_per_row_generation(fam, rows):
    name, path = fam
    bb = load(path)
    images, prompts, _, _ = rows
    batched = bb.generate(images, prompts, max_new_tokens=5)
    single = [bb.generate([im], [p], max_new_tokens=5)[0] for im, p in zip(images, prompts)]
    assert batched == single, name


def test_generation_stops_at_the_turn_end_token(fam, rows):
    """With the turn-end token made the argmax everywhere, generation must stop after it
    (the generation config's / template's end-of-turn ids, not only tokenizer.eos_token)."""
    name, path = fam
    bb = load(path)
    images, prompts, _, _ = rows
    gen = bb.model.generation_config.eos_token_id
    gen = [gen] if isinstance(gen, int) else list(gen or [])
    assert set(gen) <= set(bb.stop_token_ids) and bb.turn_end_id in bb.stop_token_ids
    end = bb.turn_end_id

    def force_end(module, args, out):  # the LM head's logits: turn end wins everywhere
        out = out.clone()
        out[..., end] = out.abs().amax() + 1e3
        return out

    bb.model.get_output_embeddings().register_forward_hook(force_end)
    seen = {}
    real = bb.model.generate

    def spy(*a, **kw):
        seen["prompt"] = kw["input_ids"].shape[1]
        seen["out"] = out = real(*a, **kw)
        return out

    bb.model.generate = spy
    texts = bb.generate(images[:2], prompts[:2], max_new_tokens=6)
    assert texts == ["", ""]
    new = seen["out"][:, seen["prompt"] :]
    assert new.tolist() == [[end], [end]], (
        f"{name}: generation ran past the turn end: {new.tolist()}"
    )


# ------------------------------------------------------------------------------------ save
def test_save_reload_same_logps(fam, rows, tmp_path, perturb):
    name, path = fam
    bb = load(path)
    perturb(bb.model, 0.02, 3)
    images, prompts, chosen, _ = rows
    batch = bb.collate(images, prompts, chosen)
    with torch.no_grad():
        before = bb.logps(batch).sum
    bb.save_pretrained(tmp_path / "saved")
    again = load(tmp_path / "saved")
    with torch.no_grad():
        after = again.logps(again.collate(images, prompts, chosen)).sum
    assert torch.allclose(before, after, atol=1e-5), name


# ------------------------------------------------------------------------------------ multi-image
def test_two_images_per_row_match_the_per_row_reference(fam, rows):
    name, path = fam
    if not FAMILIES[name].multi_image:
        pytest.skip(f"{name} takes one image per sample")
    bb = load(path)
    images, _, chosen, _ = rows
    prompt = "Compare <image 2> with <image 1>."
    batch = bb.collate(
        [[images[0], images[1]], [images[2], images[0]]], [prompt, prompt], chosen[:2]
    )
    for i, ims in enumerate(([images[1], images[0]], [images[0], images[2]])):  # placed order
        ours, ids = row_token_logps(bb, batch, i)
        ref, ref_ids = reference_token_logps(
            bb, ims, "Compare <image 1> with <image 2>.", chosen[i]
        )
        assert ids == ref_ids
        d = (ours - ref).abs().max().item()
        MEASURED.setdefault(name, {})["two_images_vs_reference"] = d
        assert d < TOL, f"{name}: two images per row, |Δ| {d:.2e}"
