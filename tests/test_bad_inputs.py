"""Bad input (docs/reliability.md): each one fails with an error that says what is wrong and
where (file, row, field, config key, path, stage) — one test per kind of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from cwdpo.data.records import DataError, ImageRef
from cwdpo.run.config import CONFIG_DIR
from tests.formats import (
    karpathy_rows,
    make_image,
    write_corrupt_image,
    write_karpathy,
    write_trl_jsonl,
)


def train_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


# ----------------------------------------------------------------------------- images
def test_missing_image_names_the_file(tmp_path):
    from cwdpo.data.karpathy import read_karpathy

    missing = tmp_path / "nope.jpg"
    with pytest.raises(DataError, match=f"image file not found: {missing}"):
        ImageRef(path=str(missing)).load()
    fx = write_karpathy(tmp_path / "coco", missing_images=(0,))
    name = fx.rows[0]["filename"]
    with pytest.raises(DataError, match=name) as err:
        read_karpathy(fx.path, fx.image_root, splits=("train", "val", "test"))
    assert str(fx.path) in str(err.value)


def test_corrupt_image_names_the_file(tmp_path):
    from cwdpo.data.datamodules import _Indexed
    from cwdpo.data.records import CaptionRecord

    bad = write_corrupt_image(tmp_path / "broken.jpg")
    rec = CaptionRecord("img-7", ImageRef(path=str(bad)), ["a dog ."])
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        _Indexed([rec])[0]  # what a DataLoader worker does


# ----------------------------------------------------------------------------- texts
def test_empty_caption_names_file_row_and_field(tmp_path, backbone):
    from cwdpo.data.karpathy import read_karpathy

    rows = karpathy_rows()
    rows[1]["sentences"][0]["raw"] = "   "
    fx = write_karpathy(tmp_path, rows=rows)
    with pytest.raises(DataError, match=r"sentences\[0\]\.raw") as err:
        read_karpathy(fx.path, fx.image_root, splits=("train", "val", "test"))
    assert str(fx.path) in str(err.value)
    img = make_image(0)
    with pytest.raises(DataError, match="empty response text in batch row 1"):
        backbone.collate([img, img], ["Describe.", "Describe."], ["a red square .", " "])


def test_chosen_identical_to_rejected_is_refused(tmp_path, backbone):
    from cwdpo.data.trl_pairs import read_preference_pairs

    fx = write_trl_jsonl(tmp_path)
    rows = [json.loads(line) for line in fx.path.read_text().splitlines()]
    rows[2]["rejected"] = rows[2]["chosen"]
    fx.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="identical") as err:
        read_preference_pairs(fx.path, fx.image_root)
    assert fx.path.stem in str(err.value) and "2" in str(err.value)
    img = make_image(0)
    with pytest.raises(DataError, match="preference pair 1 of the batch .* identical"):
        backbone.collate_pairs(
            [img, img],
            ["Describe."] * 2,
            ["a red square .", "a blue  circle ."],
            ["a green square .", "a blue circle ."],
        )


def test_response_longer_than_max_length_is_truncated_never_the_image(backbone):
    from cwdpo.batch import IGNORE_INDEX

    img, prompt = make_image(1), "Describe the image."
    short = backbone.collate([img], [prompt], ["a red square ."])  # fits: the untruncated prompt
    prompt_len = int((short["labels"][0] == IGNORE_INDEX).sum())
    prompt_ids = [short["input_ids"][0, :prompt_len].tolist()]
    image_id = backbone.model.config.image_token_id
    n_image = prompt_ids[0].count(image_id)
    assert n_image > 0
    backbone.truncation = "warn"  # cut, counted (the default refuses: test_token_budget.py)
    backbone.max_length = len(prompt_ids[0]) + 5
    long = " ".join(["red square on the left"] * 40)
    enc = backbone.collate([img], [prompt], [long])
    ids, labels = enc["input_ids"][0], enc["labels"][0]
    assert len(ids) == backbone.max_length
    assert int((ids == image_id).sum()) == n_image  # every image token kept
    assert ids[: len(prompt_ids[0])].tolist() == prompt_ids[0]
    assert (labels[: len(prompt_ids[0])] == IGNORE_INDEX).all()
    assert labels[len(prompt_ids[0]) :].tolist() == backbone.response_ids(long)[:5]
    backbone.max_length = len(prompt_ids[0]) - 1  # the prompt alone does not fit: an error
    with pytest.raises(DataError, match=r"image tokens included.*raise model.max_length"):
        backbone.collate([img], [prompt], ["a red square ."])


# ----------------------------------------------------------------------------- config
def test_unknown_config_key_is_named():
    with pytest.raises(HydraException, match="foo"):
        train_cfg(["foo=1"])
    with pytest.raises(HydraException, match=r"stage\.cw_dpo\.betaa"):
        train_cfg(["stage.cw_dpo.betaa=0.3"])


def test_unknown_group_option_lists_the_available_ones():
    with pytest.raises(HydraException) as err:
        train_cfg(["model=nope"])
    msg = str(err.value)
    assert "model/nope" in msg and "Available options in 'model'" in msg and "tiny" in msg


def test_missing_mandatory_dataset_root_is_named():
    cfg = train_cfg(["data=coco_karpathy"])
    with pytest.raises(Exception, match=r"data\.root"):
        OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)


# ----------------------------------------------------------------------------- paths
def test_model_path_without_a_processor_is_named(tmp_path, tiny_vlm_path):
    from cwdpo.model.backbone import VLMBackbone
    from cwdpo.model.loading import ModelLoadError

    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_vlm_path) / f, weights_only / f)
    with pytest.raises(ModelLoadError, match=f"model directory {weights_only} has no processor"):
        VLMBackbone.from_pretrained(weights_only)
    with pytest.raises(ModelLoadError, match=f"model path {tmp_path / 'gone'}"):
        VLMBackbone.from_pretrained(tmp_path / "gone")


def test_dataset_root_that_does_not_exist_is_named(tmp_path):
    import hydra

    root = tmp_path / "no-such-coco"
    cfg = train_cfg(["data=coco_karpathy", f"data.root={root}"])
    source = hydra.utils.instantiate(cfg.data.source)
    with pytest.raises(DataError, match=f"image root directory not found: {root}"):
        source.captions("train")


# ----------------------------------------------------------------------------- splits and stages
def test_split_with_no_rows_is_named(tmp_path):
    from cwdpo.data.datamodules import CaptionDataModule
    from cwdpo.data.sources import CaptionFileSource, ShapesSource

    with pytest.raises(DataError, match=r"split 'test' has no rows"):
        ShapesSource(sizes={"train": 4, "val": 2, "test": 0}).captions("test")
    rows = [r for r in karpathy_rows() if r["split"] != "val"]
    fx = write_karpathy(tmp_path, rows=rows)
    src = CaptionFileSource("karpathy", str(fx.path), str(fx.image_root))
    with pytest.raises(DataError, match=f"{fx.path}: .*split 'val' has no rows"):
        src.captions("val")
    with pytest.raises(DataError, match="has no rows"):
        CaptionDataModule(src, [])


def test_stage_left_without_rows_is_named_before_training(tmp_path):
    from cwdpo.run.pipeline import run_pipeline

    cfg = train_cfg(
        [
            "debug=fast",
            f"paths.output_dir={tmp_path}",
            "data.stage_split={sft_c: 1.0, cw_dpo: 0.0}",
            "stage.run=[sft_c,cw_dpo]",
        ]
    )
    with pytest.raises(DataError, match=r"stage cw_dpo gets no training rows: data.stage_split="):
        run_pipeline(cfg)


def test_incompatible_stage_order_is_refused(tmp_path, backbone):
    from functools import partial

    import torch

    from cwdpo.run.pipeline import run_pipeline
    from cwdpo.stages import CWDPOModule

    for run, msg in (
        (["cw_dpo", "sft_c"], "must follow base_sft → sft_c → cw_dpo"),
        (["sft_c", "dpo"], r"unknown stage\(s\) \['dpo'\]"),
    ):
        cfg = train_cfg([f"paths.output_dir={tmp_path}", f"stage.run=[{','.join(run)}]"])
        with pytest.raises(ValueError, match=msg):
            run_pipeline(cfg)
    module = CWDPOModule(backbone, optimizer=partial(torch.optim.AdamW, lr=1e-4))
    with pytest.raises(RuntimeError, match="CW-DPO stage started without a reference policy"):
        module.on_fit_start()
