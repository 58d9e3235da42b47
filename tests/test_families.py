"""The family matrix: every supported open VLM family, as a tiny random-weight build of its real
transformers classes (cwdpo.model.families), through every path cwdpo runs. Adding a family = one
entry in `cwdpo.model.families.FAMILIES`.

Numbers are checked against an independent reference (`cwdpo.model.checks.reference_token_logps`,
which `python -m cwdpo.doctor` runs on a user's checkpoint too): one HF forward per row, built by
the family's own processor on the full text (prompt + response + turn end), so the model applies
its own position and attention rules (Qwen M-RoPE from mm_token_type_ids, Gemma3 bidirectional
image spans, PaliGemma's prefix-LM via `suffix=`), with no padding and no cwdpo collation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cwdpo.batch import IGNORE_INDEX
from cwdpo.model.backbone import VLMBackbone
from cwdpo.model.checks import end_token_text, reference_token_logps, row_token_logps
from cwdpo.model.families import FAMILIES, ensure_family

pytestmark = pytest.mark.families  # `make test-fast` skips the matrix

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


def load(path: Path, trained: bool = False, **kw) -> VLMBackbone:
    """A fresh backbone in eval mode. trained=True adds seeded noise (scale 0.1) to every
    weight: random-init attention is nearly uniform, which hides mask and position bugs (a
    dropped Gemma3 token_type_ids moves response log-probs by 1e-4 at init, by 6e-2 here)."""
    from tests.conftest import perturb_

    torch.manual_seed(0)
    bb = VLMBackbone.from_pretrained(path, max_length=kw.pop("max_length", 384), **kw)
    bb.model.eval()
    if trained:
        perturb_(bb.model, 0.1, 1)
    return bb


@pytest.fixture(scope="module")
def rows():
    """Three ShapesWorld rows with different prompt and response lengths (padding exercised)."""
    from cwdpo.data.shapes import ShapesWorld

    ps = ShapesWorld().pairs("train", 3)
    prompts = [ps[0].prompt, "What is in the picture?", "Describe the shapes, left to right."]
    return [p.image.load() for p in ps], prompts, [p.chosen for p in ps], [p.rejected for p in ps]


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
    end = end_token_text(bb)
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
        for k in ("token_type_ids", "mm_token_type_ids"):  # prompt-width keys span the row
            assert k not in batch or batch[k].shape == batch["input_ids"].shape, k


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
    bb.truncation = "warn"  # cut, counted (the default refuses: test_token_budget.py)
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
    bb = load(path, trained=True)
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
    bb = load(path, trained=True)
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
    bb = load(path, trained=True)
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
    end = bb.tokenizer.convert_tokens_to_ids(end_token_text(bb))

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
    bb = load(path, trained=True)
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
        m = MEASURED.setdefault(name, {})
        m["two_images_vs_reference"] = max(m.get("two_images_vs_reference", 0.0), d)
        assert d < TOL, f"{name}: two images per row, |Δ| {d:.2e}"


# ------------------------------------------------------------------------------------ what trains
def test_lora_short_form_from_a_dictconfig(fam):
    from omegaconf import OmegaConf

    name, path = fam
    bb = load(path, lora=OmegaConf.create({"r": 4, "alpha": 8}))
    cfg = bb.model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha) == (4, 8)
    assert any("lora_A" in n for n, _ in bb.model.named_parameters())


@pytest.mark.parametrize("frozen", [("vision",), ("projector",), ("vision", "projector")])
def test_freeze_vision_tower_and_projector(fam, rows, frozen):
    from cwdpo.model.loading import module_group

    name, path = fam
    bb = load(path, freeze_vision="vision" in frozen, freeze_projector="projector" in frozen)
    images, prompts, chosen, _ = rows
    bb.model.train()
    bb.logps(bb.collate(images[:2], prompts[:2], chosen[:2])).sum.sum().backward()
    groups: dict[str, list[bool]] = {}
    got_grad: dict[str, bool] = {}
    for n, p in bb.model.named_parameters():
        g = module_group(n)
        groups.setdefault(g, []).append(p.requires_grad)
        got_grad[g] = got_grad.get(g, False) or p.grad is not None
        if not p.requires_grad:
            assert p.grad is None, n
    assert set(groups) == {"vision", "projector", "language"}, (name, set(groups))
    for g, flags in groups.items():
        assert all(f == (g not in frozen) for f in flags), (name, g)
        assert got_grad[g] == (g not in frozen), (name, g)  # what is not frozen does train


def test_lora_language_preset_targets_only_the_language_model(fam):
    name, path = fam
    bb = load(path, lora={"r": 2, "alpha": 4, "target_modules": "language"}, freeze_vision=True)
    wrapped = [n for n, m in bb.model.named_modules() if hasattr(m, "lora_A")]
    assert wrapped, name
    from cwdpo.model.loading import module_group

    assert {module_group(n) for n in wrapped} == {"language"}, name
    allin = load(path, lora={"r": 2, "alpha": 4}, freeze_vision=True)
    groups = {module_group(n) for n, m in allin.model.named_modules() if hasattr(m, "lora_A")}
    assert "vision" not in groups and "language" in groups, (name, groups)


# ------------------------------------------------------------------------------------ end to end
PIPE = [
    "+debug=fast",
    "stage.run=[sft_c,cw_dpo]",
    "eval.caption_metrics=false",
    "eval.calibration=false",
    "eval.n_records=4",
    "eval.max_new_tokens=4",
    "data.source.sizes={train:16,val:4,test:4,probe:4}",
    "data.batch_size=4",
]


@pytest.mark.parametrize("mode", ["lora_on_policy", "full"])
def test_short_pipeline_trains(fam, rows, tmp_path, mode):
    from cwdpo.run.pipeline import run_pipeline
    from tests.helpers import compose_cfg

    name, path = fam
    extra = (
        [
            "model.lora={r:4,alpha:8}",
            "negatives=on_policy",
            "negatives.num_samples=1",
            "negatives.max_new_tokens=4",
        ]
        if mode == "lora_on_policy"
        else ["negatives=dataset"]
    )
    cfg = compose_cfg([*PIPE, f"model.path={path}", *extra], tmp_path, tmp_path)
    res = run_pipeline(cfg)
    st = res["stages"]
    assert st["sft_c"]["steps"] == 2 and st["cw_dpo"]["steps"] == 2
    srcs = st["cw_dpo"]["negatives"]["sources"]
    if mode == "lora_on_policy":
        assert srcs.get("on_policy", 0) > 0, srcs
    images, prompts, chosen, _ = rows
    before, after = load(path), load(tmp_path / "checkpoints" / "cw_dpo_hf")
    with torch.no_grad():
        a = before.logps(before.collate(images, prompts, chosen)).sum
        b = after.logps(after.collate(images, prompts, chosen)).sum
    assert torch.isfinite(b).all() and not torch.allclose(a, b), f"{name}: training changed nothing"


def test_eval_entry_point(fam, tmp_path):
    from cwdpo.run.checkpoint_eval import run_eval
    from tests.helpers import compose_cfg

    name, path = fam
    cfg = compose_cfg(
        [
            "eval.tasks=[captioning,calibration]",
            "eval.n_records=4",
            "eval.max_new_tokens=4",
            "data.source.sizes={train:8,val:4,test:4,probe:4}",
            f"ckpt={path}",
        ],
        tmp_path,
        tmp_path,
        name="eval",
    )
    res = run_eval(cfg)
    assert 0.0 <= res["calib/ece"] <= 1.0 and "cider" in res
    assert (tmp_path / "eval.json").is_file()


# ------------------------------------------------------------------------------------ multi-image data
def test_trl_rows_with_several_images_train_on_all_of_them(fam, tmp_path):
    """A TRL-style row with two images reaches the model with both, each row's log-probs equal
    to the per-row reference fed both images."""
    from cwdpo.data.datamodules import PreferenceDataModule
    from cwdpo.data.sources import PreferenceFileSource
    from cwdpo.data.trl_pairs import read_preference_pairs
    from tests.formats import write_image

    name, path = fam
    bb = load(path, trained=True)
    rows = []
    for i in range(6):
        a, b = write_image(tmp_path / f"a{i}.png", i), write_image(tmp_path / f"b{i}.png", i + 10)
        rows.append(
            {
                "images": [a.name, b.name],
                "prompt": "What differs between the two images?",
                "chosen": f"the second is brighter {i}",
                "rejected": f"they are equal {i}",
            }
        )
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = PreferenceFileSource(str(f), holdout={"val": 1, "test": 1, "probe": 1})
    dm = PreferenceDataModule(
        src, src.captions("train"), batch_size=2, collate=bb.collate, collate_pairs=bb.collate_pairs
    )
    raw = next(iter(dm.train_dataloader()))
    assert all(isinstance(im, list) and len(im) == 2 for im in raw[1])
    batch = dm.on_before_batch_transfer(raw, 0)
    n = batch.n
    pairs = read_preference_pairs(f)
    by_id = {p.image_id: p for p in pairs}
    for i, image_id in enumerate(batch.image_ids):
        p = by_id[image_id]
        ims = [r.load() for r in p.meta["images"]]
        for row, resp in ((i, p.chosen), (n + i, batch.rejected[i])):
            ours, ids = row_token_logps(bb, batch.inputs, row)
            ref, ref_ids = reference_token_logps(bb, ims, p.prompt, resp)
            assert ids == ref_ids
            assert (ours - ref).abs().max().item() < TOL, name


def test_mmmu_images_are_placed_where_the_question_puts_them(fam, tmp_path, monkeypatch):
    from cwdpo.data.multiple_choice import read_mmmu
    from cwdpo.data.records import load_images
    from cwdpo.run.evaluation import mc_prompt, predict_multiple_choice
    from tests.formats import write_mmmu_parquet

    name, path = fam
    bb = load(path, trained=True)
    qs = read_mmmu(write_mmmu_parquet(tmp_path).path)
    q = next(q for q in qs if q.meta["num_images"] == 2)  # "Compare <image 2> and <image 3>."
    assert mc_prompt(q).startswith("Compare <image 1> and <image 2>.")
    seen = []
    real = bb.collate

    def spy(images, prompts, responses):
        seen.extend(zip(images, prompts, responses))
        return real(images, prompts, responses)

    monkeypatch.setattr(bb, "collate", spy)
    predict_multiple_choice(bb, [q], scoring="letter", batch_size=4)
    assert len(seen) == len(q.options) and all(len(im) == 2 for im, _, _ in seen)
    batch = real([load_images(q)], [mc_prompt(q)], ["A"])
    ours, ids = row_token_logps(bb, batch, 0)
    ref, ref_ids = reference_token_logps(bb, load_images(q), mc_prompt(q), "A")
    assert ids == ref_ids and (ours - ref).abs().max().item() < TOL
    # the images sit between the question's words, in the question's order (where the family's
    # template renders content in order; LLaVA-NeXT/OneVision's put every image first)
    parts, order = bb.prompt_parts(mc_prompt(q), 2)
    kinds = [p["type"] if p["type"] == "image" else p["text"].split()[0] for p in parts]
    assert kinds[:4] == ["Compare", "image", "and", "image"] and order == [0, 1]


def test_a_placeholder_for_an_image_the_row_lacks_is_refused(rows, family_dirs, tiny_cache_dir):
    from cwdpo.data.records import DataError

    bb = load(family_path("paligemma", family_dirs, tiny_cache_dir))
    images, _, chosen, _ = rows
    with pytest.raises(DataError, match=r"<image 3> but its row has 2"):
        bb.collate([[images[0], images[1]]], ["Compare <image 3>."], chosen[:1])


# ------------------------------------------------------------------------------------ configs
REAL_MODELS = {  # conf/model entry → the family it loads as
    "qwen2_5_vl_7b": "qwen2_5_vl",
    "qwen3_vl_8b": "qwen3_vl",
    "qwen2_vl_2b": "qwen2_vl",
    "smolvlm": "smolvlm",
    "smolvlm2": "smolvlm",
    "idefics3_8b": "idefics3",
    "gemma3_4b": "gemma3",
    "paligemma": "paligemma",
    "paligemma2": "paligemma",
    "llava_next": "llava_next",
    "llava_onevision": "llava_onevision",
    "llava_1_5_7b": "llava",
}


@pytest.mark.parametrize("entry", sorted(REAL_MODELS))
def test_real_model_entry_composes_and_its_settings_load(
    entry, tmp_path, family_dirs, tiny_cache_dir
):
    """Each conf/model entry composes, points at a local directory, and every setting it makes
    takes effect on the backbone it builds (loaded against the tiny build of its family): the
    dtype, attention kernel and gradient checkpointing reach the model, and the LoRA preset
    wraps the language model only."""
    import hydra
    from omegaconf import OmegaConf

    from cwdpo.model.loading import module_group
    from tests.helpers import compose_cfg

    cfg = compose_cfg([f"model={entry}"], tmp_path, tmp_path)
    m = OmegaConf.to_container(cfg.model, resolve=True)
    assert m["path"].startswith(cfg.paths.models_dir + "/"), m["path"]
    if entry.startswith("qwen"):
        px = m["processor_kwargs"]
        assert 0 < px["min_pixels"] < px["max_pixels"]
    path = family_path(REAL_MODELS[entry], family_dirs, tiny_cache_dir)
    over: dict = {"path": str(path)}
    if entry.startswith("qwen"):  # the tiny builds use 8-pixel patches: keep their budget
        over["processor_kwargs"] = {"min_pixels": 32 * 32, "max_pixels": 32 * 32}
    if entry.startswith(("smolvlm", "idefics3")):
        over["processor_kwargs"] = {"size": {"longest_edge": 32}}
    bb = hydra.utils.instantiate({**m, **over})
    model = bb.model.get_base_model() if hasattr(bb.model, "get_base_model") else bb.model
    assert model.config.model_type == FAMILIES[REAL_MODELS[entry]].model_type
    dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    assert dtypes == {getattr(torch, m["dtype"])}, dtypes
    assert model.config._attn_implementation == m["attn_implementation"]
    checkpointing = getattr(type(model), "is_activation_checkpointing", None)  # transformers 5
    checkpointing = "is_activation_checkpointing" if checkpointing else "is_gradient_checkpointing"
    assert getattr(model, checkpointing) == bool(m["gradient_checkpointing"])
    wrapped = {module_group(n) for n, mod in bb.model.named_modules() if hasattr(mod, "lora_A")}
    assert wrapped and "vision" not in wrapped, (entry, wrapped)
    if m["lora"]["target_modules"] == "language":
        assert wrapped == {"language"}, (entry, wrapped)


def test_qwen_min_max_pixels_bound_the_image_token_count(rows, family_dirs, tiny_cache_dir):
    images, prompts, chosen, _ = rows
    path = family_path("qwen2_vl", family_dirs, tiny_cache_dir)
    counts = []
    for side in (32, 64):
        bb = load(path, processor_kwargs={"min_pixels": side * side, "max_pixels": side * side})
        batch = bb.collate(images[:1], prompts[:1], chosen[:1])
        counts.append(int((batch["input_ids"] == bb.model.config.image_token_id).sum()))
        ours, ids = row_token_logps(bb, batch, 0)
        ref, ref_ids = reference_token_logps(bb, images[0], prompts[0], chosen[0])
        assert ids == ref_ids and (ours - ref).abs().max().item() < TOL
    assert counts == [4, 16]  # (side / 8 px per patch / 2 merge)²


# ------------------------------------------------------------------------------------ doctor
def test_doctor_passes_on_every_family(fam, rows):
    from cwdpo.model.checks import Rows, run_checks

    name, path = fam
    bb = load(path, lora={"r": 2, "alpha": 4})
    images, prompts, chosen, rejected = rows
    checks = run_checks(bb, Rows(images, prompts, chosen, rejected), tol=TOL)
    failed = [c for c in checks if c.status == "fail"]
    assert not failed, (name, failed)
    assert {c.name for c in checks if c.status == "pass"} >= {
        "labels = response + turn end",
        "log-probs vs per-row HF forward",
        "no label leak (later token → earlier log-prob)",
        "generation stops at the turn end",
        "batched generation = per-row",
        "LoRA targets found",
        "reference cache = plain",
        "prefix sharing = plain",  # runs (not skips) on every family
    }


def test_doctor_fails_where_a_long_run_would_compute_something_wrong(
    tmp_path, family_dirs, tiny_cache_dir, monkeypatch
):
    """Gemma3 with its token_type_ids dropped (the old behaviour): causal image attention,
    log-probs off the model's own forward → the doctor fails, naming the check, exit code 1."""
    import cwdpo.model.backbone as B
    from cwdpo.run.doctor import run_doctor
    from tests.helpers import compose_cfg

    path = tmp_path / "gemma3"
    load(family_path("gemma3", family_dirs, tiny_cache_dir), trained=True).save_pretrained(path)
    cfg = compose_cfg([f"model.path={path}", "doctor.tol=1e-4"], tmp_path, tmp_path, name="doctor")
    checks, rc = run_doctor(cfg)
    assert rc == 0, [c for c in checks if c.status == "fail"]
    monkeypatch.setattr(B, "PER_TOKEN_KEYS", ())  # collate now drops token_type_ids
    monkeypatch.setattr(B, "TEXT_KEYS", (*B.TEXT_KEYS, "token_type_ids"))
    checks, rc = run_doctor(cfg)
    bad = {c.name: c for c in checks if c.status == "fail"}
    assert rc == 1 and "log-probs vs per-row HF forward" in bad, checks
    assert "FAIL" in (tmp_path / "doctor.md").read_text()


@pytest.mark.subprocess
def test_doctor_cli(tmp_path, family_dirs, tiny_cache_dir):
    import subprocess
    import sys

    path = family_path("qwen2_vl", family_dirs, tiny_cache_dir)
    env = {**os.environ, "CWDPO_CACHE": str(tiny_cache_dir)}
    proc = subprocess.run(
        [sys.executable, "-m", "cwdpo.doctor", f"model.path={path}", f"hydra.run.dir={tmp_path}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| log-probs vs per-row HF forward | PASS |" in proc.stdout
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert report["checks"] and all(c["status"] != "fail" for c in report["checks"])


def test_bench_takes_a_tiny_family(tiny_cache_dir, tmp_path):
    from cwdpo.bench import main

    out = tmp_path / "bench.json"
    main(
        [
            "--model",
            "tiny:qwen2_vl",
            "--cache",
            str(tiny_cache_dir),
            "--pairs",
            "2",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--no-trl",
            "--no-lora",
            "--no-generation",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert (
        "qwen2_vl" in saved["setup"]["model"]
        and saved["variants"]["dpo/plain"]["samples_per_s"] > 0
    )


def test_gradient_checkpointing_gives_the_same_logps_and_grads(fam, rows):
    """The shipped real-model entries turn gradient checkpointing on: same numbers either way."""
    name, path = fam
    images, prompts, chosen, _ = rows
    out = []
    for gc in (False, True):
        bb = load(path, trained=True, gradient_checkpointing=gc)
        bb.model.train()
        lp = bb.logps(bb.collate(images[:2], prompts[:2], chosen[:2])).sum
        lp.sum().backward()
        grads = {n: p.grad.clone() for n, p in bb.model.named_parameters() if p.grad is not None}
        out.append((lp.detach(), grads))
    (a, ga), (b, gb) = out
    assert torch.allclose(a, b, atol=1e-5), name
    assert ga.keys() == gb.keys() and ga
    worst = max((ga[k] - gb[k]).abs().max().item() / (ga[k].abs().max().item() + 1e-8) for k in ga)
    assert worst < 1e-4, f"{name}: relative gradient difference {worst:.2e}"


# ------------------------------------------------------------------------------------ fast path
FAST_MODES = ["full", "full+gc", "lora", "lora+gc", "full+eager"]
GRAD_TOL = {"atol": 1e-5, "rtol": 1e-4}


@pytest.mark.parametrize("mode", FAST_MODES)
def test_shared_prefix_equals_plain_logps_and_grads(fam, rows, mode):
    """The packed shared-prefix forward (one row [prefix | chosen | rejected] per pair) gives
    the plain path's log-probs and every parameter gradient, gradient checkpointing on and
    off, full fine-tuning and LoRA, sdpa and eager attention (bool vs additive masks); rows
    have three different prompt lengths."""
    from cwdpo.model.prefix import shared_prefix_logps, split_pairs, supports_prefix_sharing

    name, path = fam
    lora = {"r": 4, "alpha": 8} if mode.startswith("lora") else None
    attn = {"attn_implementation": "eager"} if mode.endswith("eager") else {}
    bb = load(path, trained=True, lora=lora, gradient_checkpointing=mode.endswith("gc"), **attn)
    bb.model.train()
    if attn:
        assert bb.model.config.get_text_config()._attn_implementation == "eager", name
    images, prompts, chosen, rejected = rows
    batch = bb.collate_pairs(images, prompts, chosen, rejected)
    n = len(images)
    assert supports_prefix_sharing(bb.model, batch), name
    sp = split_pairs(batch, n, bb.model)
    assert sp.inputs["input_ids"].shape[0] == n  # one packed row per pair
    n_img = int((batch["input_ids"] == bb.model.config.image_token_id).sum())
    assert int((sp.inputs["input_ids"] == bb.model.config.image_token_id).sum()) * 2 == n_img
    w = torch.linspace(0.5, 2.0, 2 * n)  # distinct row weights: chosen/rejected grads differ
    out = []
    for fn in (lambda: bb.logps(batch), lambda: shared_prefix_logps(bb.model, batch, n)):
        lp = fn()
        ((lp.sum * w).sum() + lp.mean.sum()).backward()
        grads = {k: p.grad.clone() for k, p in bb.model.named_parameters() if p.grad is not None}
        bb.model.zero_grad(set_to_none=True)
        out.append((lp, grads))
    (plain, gp), (fast, gf) = out
    d_logp = (fast.sum - plain.sum).abs().max().item()
    assert torch.equal(fast.count, plain.count)
    torch.testing.assert_close(fast.sum, plain.sum, atol=TOL, rtol=1e-5)
    torch.testing.assert_close(fast.mean, plain.mean, atol=TOL, rtol=1e-5)
    assert gp.keys() == gf.keys() and gp, name
    if lora:
        assert all("lora_" in k for k in gp)
    else:  # the vision tower gets its gradient through the shared prefix too
        assert any("vision" in k or "visual" in k for k in gp), name
    d_grad = max((gf[k] - gp[k]).abs().max().item() for k in gp)
    for k in gp:
        torch.testing.assert_close(gf[k], gp[k], **GRAD_TOL, msg=f"{name} {mode} {k}")
    m = MEASURED.setdefault(name, {})
    m[f"prefix_logp_{mode}"], m[f"prefix_grad_{mode}"] = d_logp, d_grad


def test_reference_cache_hits_on_the_second_epoch(fam, rows, tmp_path):
    """Cached reference log-probs equal the plain reference forward on every family (packed
    Qwen patches included); the second pass over the pairs is all hits, no forward; a partial
    miss computes the missing pair only (packed patches split per pair by image_grid_thw)."""
    from cwdpo.model.ref_cache import (
        RefLogpCache,
        cached_reference_logps,
        pair_keys,
        reference_fingerprint,
    )

    name, path = fam
    bb = load(path, trained=True)
    bb.snapshot_reference()
    from tests.conftest import perturb_

    perturb_(bb.model, 0.05, 2)  # policy ≠ reference
    images, prompts, chosen, rejected = rows
    batch = bb.collate_pairs(images, prompts, chosen, rejected)
    n = len(images)
    expected = bb.logps(batch, reference=True).sum
    cache = RefLogpCache(tmp_path).bind(reference_fingerprint(bb))
    seen = []
    real = bb.pair_logps

    def counting(b, k, **kw):
        seen.append(k)
        return real(b, k, **kw)

    bb.pair_logps = counting
    for _epoch in range(2):  # the second pass is the second epoch
        got = cached_reference_logps(bb, cache, batch, n, prefix_sharing=True)
        torch.testing.assert_close(got, expected, atol=TOL, rtol=1e-5)
    assert seen == [n] and cache.hits == n and cache.misses == n, (name, seen)
    cache.table.pop(pair_keys(batch, n, cache.fingerprint)[1])
    got = cached_reference_logps(bb, cache, batch, n, prefix_sharing=True)
    assert seen == [n, 1], (name, seen)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=1e-5)
    # keys do not depend on the batch a pair sits in (another epoch reshuffles the batches)
    keys = pair_keys(batch, n, cache.fingerprint)
    sub = bb.collate_pairs(
        [images[2], images[0]],
        [prompts[2], prompts[0]],
        [chosen[2], chosen[0]],
        [rejected[2], rejected[0]],
    )
    assert pair_keys(sub, 2, cache.fingerprint) == [keys[2], keys[0]], name
    MEASURED.setdefault(name, {})["ref_cache_second_epoch_hits"] = cache.hits
