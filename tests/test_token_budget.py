"""Token budgets, issue 24 (docs/reliability.md, "Token budget"): responses are never cut in silence,
rows that cannot train fail before training naming file, row, image and the numbers, max_length
stays within the model's positions, and every conf/model entry's max_length fits its own
image-token budget."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from cwdpo.batch import IGNORE_INDEX
from cwdpo.errors import DataError
from cwdpo.model.families import FAMILIES, ensure_family
from cwdpo.run.config import CONFIG_DIR
from tests.formats import write_image
from tests.helpers import compose_cfg

PROMPT = "Describe the image."


def prompt_len(bb, image, prompt: str) -> int:
    ids = bb.prompt_ids([image], [prompt])
    return len(ids[0])


# ------------------------------------------------------------------------------ collate policy
def test_a_response_that_does_not_fit_is_an_error_by_default(backbone, pair_batch):
    img, prompt = pair_batch.images[0], pair_batch.prompts[0]
    p = prompt_len(backbone, img, prompt)
    backbone.max_length = p + 1  # the case of the issue: room for one response token
    pattern = (
        rf"batch row 0 .*prompt {p} \+ response \d+ tokens .*model.max_length={p + 1}.*truncation"
    )
    with pytest.raises(DataError, match=pattern):
        backbone.collate([img], [prompt], pair_batch.chosen[:1])
    with pytest.raises(DataError, match=pattern):
        backbone.collate_pairs([img], [prompt], pair_batch.chosen[:1], pair_batch.rejected[:1])


def test_warn_cuts_counts_and_logs_but_never_trains_identical_label_rows(
    backbone, pair_batch, caplog
):
    img, prompt = pair_batch.images[0], pair_batch.prompts[0]
    p = prompt_len(backbone, img, prompt)
    backbone.truncation, backbone.max_length = "warn", p + 3
    with caplog.at_level(logging.WARNING, logger="cwdpo.model.truncation"):
        out = backbone.collate([img], [prompt], pair_batch.chosen[:1])
    assert int((out["labels"] != IGNORE_INDEX).sum()) == 3
    assert backbone.truncation_stats.cut_rows == 1
    assert "response cut to fit" in caplog.text and f"model.max_length={p + 3}" in caplog.text
    chosen, rejected = "a red square on the left .", "a blue circle on the right ."
    first = [backbone.response_ids(t)[0] for t in (chosen, rejected)]
    assert first[0] == first[1]  # both start with "a": one token of room makes them equal
    backbone.max_length = p + 1
    with pytest.raises(DataError, match="preference pair 0 .*identical label rows"):
        backbone.collate_pairs([img], [prompt], [chosen], [rejected])


def test_drop_pair_drops_the_pair_in_the_data_module_and_counts_it(backbone, pair_batch):
    from cwdpo.data.datamodules import PreferenceDataModule
    from cwdpo.data.sources import ShapesSource

    src = ShapesSource(sizes={"train": 4, "val": 2, "test": 2})
    recs = src.captions("train")
    dm = PreferenceDataModule(
        src, recs, collate=backbone.collate, collate_pairs=backbone.collate_pairs, batch_size=4
    )
    backbone.truncation = "drop_pair"
    backbone.max_length = prompt_len(backbone, pair_batch.images[0], pair_batch.prompts[0]) + 12
    long = " ".join(["a red square on the left ."] * 10)
    negs = [("a blue circle .", "easy"), (long, "easy"), ("a green square .", "hard:colour")]
    batch = dm._pair_batch(
        recs[:3], pair_batch.images[:3], pair_batch.prompts[:3], ["a red square ."] * 3, negs
    )
    assert batch.n == 2 and batch.rejected == ["a blue circle .", "a green square ."]
    assert batch.inputs["input_ids"].shape[0] == 4 and dm.dropped_over_budget == 1
    assert batch.image_ids == [recs[0].image_id, recs[2].image_id]


def test_pairs_dropped_at_collate_time_are_not_counted_as_trained(backbone):
    """Under drop_pair the stage's counts (pairs trained, negatives by source, hence
    samples per pair and the dataset fraction) are of the pairs that train, not those dropped."""
    from cwdpo.data.datamodules import NegativeConfig, PreferenceDataModule
    from cwdpo.data.records import load_images
    from cwdpo.data.sources import ShapesSource

    src = ShapesSource(sizes={"train": 4, "val": 2, "test": 2})
    recs = src.captions("train")
    dm = PreferenceDataModule(
        src,
        recs,
        collate=backbone.collate,
        collate_pairs=backbone.collate_pairs,
        batch_size=4,
        negatives=NegativeConfig(kind="mixed", dataset_fraction=1.0),
    )
    backbone.truncation = "drop_pair"
    backbone.max_length = prompt_len(backbone, load_images(recs[0]), src.prompt) + 40
    long = " ".join(["a red square on the left ."] * 20)
    script = iter(
        [("a blue circle .", "easy"), (long, "easy"), ("a green square .", "hard:colour")]
    )
    dm._negative = lambda rec, chosen, rng: next(script)
    batch = dm.on_before_batch_transfer(([0, 1, 2], [load_images(r) for r in recs[:3]]), 0)
    assert batch.n == 2 and dm.dropped_over_budget == 1
    assert dm.stats.pairs == 2 and dm.stats.counts == {"easy": 1, "hard:colour": 1}


# ------------------------------------------------------------------------------ before training
def write_pairs(root: Path, rows: list[dict], sizes: dict[int, tuple[int, int]] | None = None):
    """A TRL JSONL of `rows` (prompt/chosen/rejected), one PNG per row (24² unless `sizes`)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    path = root / "pairs.jsonl"
    with path.open("w") as f:
        for k, row in enumerate(rows):
            w, h = (sizes or {}).get(k, (24, 24))
            Image.new("RGB", (w, h), (40 * k % 255, 90, 200)).save(root / "img" / f"{k}.png")
            f.write(json.dumps({"images": [f"img/{k}.png"], **row}) + "\n")
    return path


def pair_rows(n: int = 10) -> list[dict]:
    return [
        {"prompt": PROMPT, "chosen": f"a red square number {k} .", "rejected": "a blue circle ."}
        for k in range(n)
    ]


def trl_cfg(tmp_path: Path, path: Path, *extra: str):
    over = [
        "data=trl_pairs",
        f"data.path={path}",
        "data.source.holdout={val: 1, test: 1, probe: 1}",
        "+debug=fast",
        "stage.run=[sft_c,cw_dpo]",
        "eval.caption_metrics=false",
        *extra,
    ]
    return compose_cfg(over, tmp_path / "out", tmp_path / "cache")


def budget_of(cfg):
    """(backbone, source, records, test, run) as the pipeline builds them."""
    import hydra

    from cwdpo.run.pipeline import stage_records, stages_to_run

    backbone = hydra.utils.instantiate(cfg.model)
    source = hydra.utils.instantiate(cfg.data.source)
    run = stages_to_run(cfg)
    test = source.captions(cfg.eval.split)[: cfg.eval.n_records]
    return backbone, source, stage_records(cfg, source, run), test, run


def test_an_over_long_prompt_in_stage_2_rows_fails_before_any_training(tmp_path):
    from cwdpo.run.pipeline import run_pipeline

    rows = pair_rows()
    rows[6]["prompt"] = "Describe " + "the shapes and their colours " * 60  # a cw_dpo row
    path = write_pairs(tmp_path, rows)
    cfg = trl_cfg(tmp_path, path)
    with pytest.raises(DataError) as e:
        run_pipeline(cfg)
    msg = str(e.value)
    assert f"{path}: row 6" in msg and "img/6.png" in msg and "24×24" in msg, msg
    assert "tokens (image tokens included" in msg and "model.max_length=256" in msg, msg
    assert "stage cw_dpo" in msg and "data.skip_unfit_rows=true" in msg
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing trained, not even stage 1


def test_placeholders_and_refused_images_fail_or_are_skipped_and_counted(tmp_path):
    from cwdpo.run.token_budget import check_token_budgets

    rows = pair_rows()
    rows[2]["prompt"] = "<image>\nWhat is shown?"  # LLaVA / RLAIF-V style
    rows[4]["prompt"] = "Compare <|image_pad|> with the text."
    path = write_pairs(tmp_path, rows, sizes={3: (2400, 8)})
    qwen = ensure_family("qwen2_vl", tmp_path / "fam")
    cfg = trl_cfg(tmp_path, path, f"model.path={qwen}")
    args = budget_of(cfg)
    with pytest.raises(DataError) as e:
        check_token_budgets(cfg, *args)
    msg = str(e.value)
    assert f"{path}: row 2" in msg and "'<image>'" in msg and "(and 2 more row(s)" in msg, msg
    rows[2]["prompt"] = rows[4]["prompt"] = PROMPT
    path = write_pairs(tmp_path, rows, sizes={3: (2400, 8)})
    with pytest.raises(DataError) as e:  # the 2400×8 image alone
        check_token_budgets(cfg, *budget_of(cfg))
    msg = str(e.value)
    assert f"{path}: row 3" in msg and "img/3.png (2400×8)" in msg, msg
    assert "refused by the qwen2_vl processor" in msg and "aspect ratio" in msg, msg
    rows[2]["prompt"] = "<image>\nWhat is shown?"
    path = write_pairs(tmp_path, rows, sizes={3: (2400, 8)})
    cfg = trl_cfg(tmp_path, path, f"model.path={qwen}", "data.skip_unfit_rows=true")
    _, _, records, _, _ = args = budget_of(cfg)
    out, _, report = check_token_budgets(cfg, *args)
    got = {k: report["sft_c"][k] + report["cw_dpo"][k] for k in report["sft_c"] if "skip" in k}
    assert got == {"skipped_placeholder": 1, "skipped_image_refused": 1, "skipped_long_prompt": 0}
    n_in = len(records["sft_c"]) + len(records["cw_dpo"])
    assert len(out["sft_c"]) + len(out["cw_dpo"]) == n_in - 2


def test_response_budget_follows_the_policy_before_training(tmp_path):
    from cwdpo.run.token_budget import check_token_budgets

    rows = pair_rows()
    rows[1]["rejected"] = "a blue circle " * 80  # a stage-1 row's negative cannot fit
    path = write_pairs(tmp_path, rows)
    cfg = trl_cfg(tmp_path, path, "stage.sft_c.datamodule.gentle_negatives=true")
    with pytest.raises(DataError, match=rf"{path}: row 1 .*prompt \d+ \+ rejected \d+ tokens"):
        check_token_budgets(cfg, *budget_of(cfg))
    cfg = trl_cfg(
        tmp_path, path, "stage.sft_c.datamodule.gentle_negatives=true", "model.truncation=drop_pair"
    )
    out, _, report = check_token_budgets(cfg, *budget_of(cfg))
    assert report["sft_c"]["dropped_over_length"] == 1
    assert all(r.meta["row"] != 1 for r in out["sft_c"])
    cfg = trl_cfg(
        tmp_path, path, "stage.sft_c.datamodule.gentle_negatives=true", "model.truncation=warn"
    )
    out, _, report = check_token_budgets(cfg, *budget_of(cfg))
    assert report["sft_c"]["cut_over_length"] == 1 and report["sft_c"]["dropped_over_length"] == 0
    rows[1]["chosen"] = rows[1]["rejected"] + "and a red square ."  # the same first 160 words
    path = write_pairs(tmp_path, rows)
    with pytest.raises(DataError, match=r"row 1 .*warn would cut chosen and rejected to identical"):
        check_token_budgets(cfg, *budget_of(cfg))


def test_max_length_above_the_position_limit_is_refused_in_one_line(tmp_path):
    from cwdpo.run.config_schema import ConfigError
    from cwdpo.run.pipeline import run_pipeline

    cfg = compose_cfg(["+debug=fast", "model.max_length=1000"], tmp_path / "o", tmp_path / "c")
    with pytest.raises(ConfigError) as e:
        run_pipeline(cfg)
    assert str(e.value) == (
        "model.max_length=1000 is above the model's position limit 512 (max_position_embeddings "
        "of its text config): set model.max_length<=512"
    )


def test_results_count_the_budget_per_stage(tmp_path):
    from cwdpo.run.pipeline import run_pipeline

    rows = pair_rows(12)
    rows[0]["chosen"] = "a red square " * 70  # an sft_c row that warn cuts
    path = write_pairs(tmp_path, rows)
    cfg = trl_cfg(tmp_path, path, "model.truncation=warn", "eval.calibration=false")
    res = run_pipeline(cfg)
    tb = res["stages"]["sft_c"]["token_budget"]
    assert tb["policy"] == "warn" and tb["cut_over_length"] == 1 and tb["cut_in_batches"] >= 0
    assert res["stages"]["cw_dpo"]["token_budget"]["cut_over_length"] == 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["stages"]["sft_c"]["token_budget"] == tb and "eval" in saved["token_budget"]


# ------------------------------------------------------------------------------ every family
@pytest.mark.families
@pytest.mark.parametrize("name", list(FAMILIES))
def test_blank_image_count_equals_the_processor_on_real_images(name, tiny_cache_dir):
    """The preflight's cached count (blank images of the same sizes) is the real one."""
    import numpy as np

    from cwdpo.model.backbone import VLMBackbone
    from cwdpo.model.budget import TokenCounter

    bb = VLMBackbone.from_pretrained(ensure_family(name, tiny_cache_dir))
    counter = TokenCounter(bb)
    rng = np.random.default_rng(0)
    rows = [[(32, 32)], [(64, 40)], [(40, 90)], [(300, 200)]]
    if FAMILIES[name].multi_image:
        rows.append([(48, 24), (24, 60)])
    for sizes in rows:
        ims = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
        ids = bb.prompt_ids([ims[0] if len(ims) == 1 else ims], [PROMPT])
        assert counter.prompt(tuple(sizes), PROMPT) == len(ids[0]), (name, sizes)


# ------------------------------------------------------------------------------ conf/model
#: The released checkpoints' vision settings (their preprocessor_config.json / processor_config
#: .json) that the tiny builds shrink: with them, the tiny build's processor classes (the real
#: ones) count the real checkpoint's image tokens (checked: Qwen2-VL at 1024×768 → 999 image
#: tokens, the figure of issue 24 with the real Qwen2VLImageProcessor).
REAL_VISION = {
    "qwen2_vl_2b": ("qwen2_vl", {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}),
    "qwen2_5_vl_7b": ("qwen2_5_vl", {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}),
    "qwen3_vl_8b": ("qwen3_vl", {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2}),
    "smolvlm": ("idefics3", {"max_image_size": {"longest_edge": 384}, "image_seq_len": 81}),
    "smolvlm2": ("smolvlm", {"max_image_size": {"longest_edge": 384}, "image_seq_len": 64}),
    "idefics3_8b": ("idefics3", {"max_image_size": {"longest_edge": 364}, "image_seq_len": 169}),
    "gemma3_4b": ("gemma3", {"size": {"height": 896, "width": 896}, "image_seq_length": 256}),
    "paligemma": ("paligemma", {"size": {"height": 224, "width": 224}, "image_seq_length": 256}),
    "paligemma2": ("paligemma", {"size": {"height": 224, "width": 224}, "image_seq_length": 256}),
    "llava_1_5_7b": (
        "llava",
        {
            "size": {"shortest_edge": 336},
            "crop_size": {"height": 336, "width": 336},
            "patch_size": 14,
        },
    ),
    "llava_next": (
        "llava_next",
        {
            "size": {"shortest_edge": 336},
            "crop_size": {"height": 336, "width": 336},
            "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
            "patch_size": 14,
        },
    ),
    "llava_onevision": (
        "llava_onevision",
        {
            "size": {"height": 384, "width": 384},
            "image_grid_pinpoints": [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],
            "num_image_tokens": 729,
        },
    ),
}


def test_real_vision_settings_give_the_real_qwen2_vl_count(tiny_cache_dir):
    from cwdpo.model.backbone import VLMBackbone

    fam, kw = REAL_VISION["qwen2_vl_2b"]
    px = {"min_pixels": 256 * 28 * 28, "max_pixels": 1280 * 28 * 28}
    bb = VLMBackbone.from_pretrained(
        ensure_family(fam, tiny_cache_dir), processor_kwargs={**kw, **px}
    )
    ids = bb.prompt_ids([Image.new("RGB", (1024, 768))], [PROMPT])
    assert ids[0].count(bb.model.config.image_token_id) == 999  # issue 24, real processor
    ids = bb.prompt_ids([Image.new("RGB", (1280, 960))], [PROMPT])
    assert ids[0].count(bb.model.config.image_token_id) == 1230


@pytest.mark.parametrize("entry", sorted(REAL_VISION))
def test_model_entry_max_length_fits_its_image_token_budget(entry, tmp_path, tiny_cache_dir):
    """max_length >= the largest prompt over PROBE_SIZES (the entry's processor_kwargs and the
    checkpoint's vision settings) + RESPONSE_RESERVE."""
    from omegaconf import OmegaConf

    from cwdpo.model.backbone import VLMBackbone
    from cwdpo.model.budget import RESPONSE_RESERVE, TokenCounter

    cfg = compose_cfg([f"model={entry}"], tmp_path, tmp_path)
    m = OmegaConf.to_container(cfg.model, resolve=True)
    fam, kw = REAL_VISION[entry]
    bb = VLMBackbone.from_pretrained(
        ensure_family(fam, tiny_cache_dir),
        chat_template=m["chat_template"],
        processor_kwargs={**kw, **(m["processor_kwargs"] or {})},
    )
    largest = TokenCounter(bb).largest_prompt(PROMPT)
    assert largest + RESPONSE_RESERVE <= m["max_length"], (entry, largest, m["max_length"])
    assert m["truncation"] == "error"


def test_every_model_entry_is_budgeted():
    names = {p.stem for p in Path(CONFIG_DIR, "model").glob("*.yaml")} - {"tiny"}
    assert names == set(REAL_VISION)


def test_collate_keeps_every_image_token_under_warn(tiny_cache_dir):
    from cwdpo.model.backbone import VLMBackbone

    bb = VLMBackbone.from_pretrained(ensure_family("qwen2_vl", tiny_cache_dir), truncation="warn")
    img = Image.new("RGB", (64, 64))
    ids = bb.prompt_ids([img], [PROMPT])
    p, image_id = len(ids[0]), bb.model.config.image_token_id
    bb.max_length = p + 2
    out = bb.collate([img], [PROMPT], ["a red square on the left ."])
    assert out["input_ids"].shape[1] == p + 2 and bb.truncation_stats.cut_rows == 1
    assert int((out["input_ids"] == image_id).sum()) == ids[0].count(image_id) > 0
    assert torch.equal(out["labels"][0, :p], torch.full((p,), IGNORE_INDEX))


def test_image_size_reads_the_header_and_honours_exif_rotation(tmp_path):
    from cwdpo.data.records import ImageRef

    path = write_image(tmp_path / "a.png", 1, size=24)
    assert ImageRef(path=str(path)).size() == (24, 24)
    im = Image.new("RGB", (40, 10))
    exif = im.getexif()
    exif[0x0112] = 6  # rotated 90°: shown 10 wide, 40 high
    im.save(tmp_path / "r.jpg", exif=exif)
    assert ImageRef(path=str(tmp_path / "r.jpg")).size() == (10, 40)
    exif[0x0112] = 3  # 180°: sizes unchanged
    im.save(tmp_path / "u.jpg", exif=exif)
    assert ImageRef(path=str(tmp_path / "u.jpg")).size() == (40, 10)


def test_a_probe_text_over_max_length_is_left_out_never_cut_nor_fatal(backbone, caplog):
    from cwdpo.callbacks.probes.sets import collate_set
    from cwdpo.data.sources import ShapesSource

    src = ShapesSource(sizes={"train": 4, "val": 2, "test": 2})
    recs = src.captions("train")
    p = prompt_len(backbone, recs[0].image.load(), src.prompt)
    backbone.max_length = p + 12
    long = " ".join(["a red square on the left ."] * 10)
    rows = [(0, "a red square ."), (1, long), (2, "a blue circle ."), (3, "a green square .")]
    with caplog.at_level(logging.WARNING, logger="cwdpo.callbacks.probes.sets"):
        ps = collate_set("gentle", backbone, src, recs, rows, bs=2)
    assert ps.texts == ["a red square .", "a blue circle .", "a green square ."]
    assert ps.image_ids == [recs[i].image_id for i in (0, 2, 3)]
    assert [b["input_ids"].shape[0] for b in ps.batches] == [1, 2]
    assert "1 text(s) left out" in caplog.text and backbone.truncation_stats.cut_rows == 0
