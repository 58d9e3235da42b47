"""Real data never trains wrong in silence (issue 24, readers and images): TRL pair files in
the encodings and containers they ship in (UTF-8 with or without BOM, parquet shards as on the
hub, `save_to_disk` directories), EXIF orientation as transformers' `load_image` applies it,
16-bit images converted instead of saturating to white, and a text-only model directory
refused first for what it is."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from cwdpo.data.image_check import check_record_images, probe_image
from cwdpo.data.records import CaptionRecord, DataError, ImageRef
from cwdpo.data.trl_pairs import read_preference_pairs
from tests.formats import (
    UNICODE_CAPTION,
    grey16,
    make_image,
    png16_rgb_bytes,
    write_exif_jpeg,
    write_trl_jsonl,
    write_trl_parquet,
)


def _texts(recs):
    return [(r.prompt, r.chosen, r.rejected) for r in recs]


# ------------------------------------------------------------------------------ encodings


def test_trl_jsonl_bad_byte_names_file_line_and_offset(tmp_path):
    fx = write_trl_jsonl(tmp_path)
    data = fx.path.read_bytes().replace("café".encode(), b"caf\xe9")  # one latin-1 byte
    fx.path.write_bytes(data)
    with pytest.raises(DataError) as e:
        read_preference_pairs(fx.path, fx.image_root)
    msg = str(e.value)
    offset = data.index(b"\xe9")
    line = data[:offset].count(b"\n") + 1
    assert UNICODE_CAPTION in fx.rows[line - 1]["chosen"]  # the row that holds the caption
    assert str(fx.path) in msg and f"line {line}" in msg
    assert f"byte {offset}" in msg and "0xe9" in msg and "UTF-8" in msg
    assert "\n" not in msg and len(msg) < 400  # one line, no dump of the read buffer


def test_trl_json_list_bad_byte_names_line(tmp_path):
    path = tmp_path / "pairs.json"
    rows = [{"images": ["a.png"], "prompt": "p", "chosen": "x", "rejected": "y"}] * 3
    text = json.dumps(rows, indent=1).replace('"y"', '"café"', 1)
    data = text.encode().replace("café".encode(), b"caf\xe9")
    path.write_bytes(data)
    with pytest.raises(DataError) as e:
        read_preference_pairs(path)
    line = data[: data.index(b"\xe9")].count(b"\n") + 1
    assert f"{path}: line {line}" in str(e.value) and "\n" not in str(e.value)


def test_trl_jsonl_with_utf8_bom_reads(tmp_path):
    fx = write_trl_jsonl(tmp_path, conversational_format=True)
    fx.path.write_bytes(b"\xef\xbb\xbf" + fx.path.read_bytes())
    assert _texts(read_preference_pairs(fx.path, fx.image_root)) == fx.expected["texts"]
    as_list = tmp_path / "list.json"
    as_list.write_bytes(b"\xef\xbb\xbf" + json.dumps(fx.rows).encode())
    assert _texts(read_preference_pairs(as_list, fx.image_root)) == fx.expected["texts"]


def test_trl_jsonl_utf16_is_named(tmp_path):
    fx = write_trl_jsonl(tmp_path)
    fx.path.write_bytes(fx.path.read_text(encoding="utf-8").encode("utf-16"))
    with pytest.raises(DataError, match=r"pairs.jsonl: .*UTF-16.*UTF-8"):
        read_preference_pairs(fx.path, fx.image_root)


def test_karpathy_json_with_bom_and_bad_byte(tmp_path):
    from cwdpo.data.karpathy import read_karpathy
    from tests.formats import write_karpathy

    fx = write_karpathy(tmp_path, "coco")
    want = read_karpathy(fx.path, fx.image_root, splits=("train",))
    fx.path.write_bytes(b"\xef\xbb\xbf" + fx.path.read_bytes())  # Notepad's UTF-8
    got = read_karpathy(fx.path, fx.image_root, splits=("train",))
    assert [r.references for r in got] == [r.references for r in want]
    data = fx.path.read_bytes().replace("café".encode(), b"caf\xe9", 1)
    fx.path.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(DataError, match=rf"dataset_coco.json: line 1, byte {offset}: 0xe9"):
        read_karpathy(fx.path, fx.image_root, splits=("train",))


# ------------------------------------------------------------------------------ parquet


def test_trl_parquet_hub_layout_directory_and_file(tmp_path):
    fx = write_trl_parquet(tmp_path / "rlaif-v", layout="trl", shards=2)
    recs = read_preference_pairs(fx.path)  # the repo dir: data/train-* shards, in order
    assert _texts(recs) == fx.expected["texts"]
    assert [r.image.load().getpixel((5, 0)) for r in recs] == fx.expected["pixels"]
    assert all(r.image.data is not None and r.image.path is None for r in recs)
    assert recs[0].meta["prompt_messages"][0]["role"] == "user"
    # each row names its own shard and its row in it, and ids are unique across shards
    assert [(r.meta["file"], r.meta["row"]) for r in recs] == [
        (str(fx.expected["files"][0]), 0),
        (str(fx.expected["files"][0]), 1),
        (str(fx.expected["files"][1]), 0),
        (str(fx.expected["files"][1]), 1),
    ]
    assert len({r.image_id for r in recs}) == 4
    (test_row,) = read_preference_pairs(fx.path, split="test")
    assert _texts([test_row]) == fx.expected["texts"][:1]
    with pytest.raises(DataError, match=r"no split 'validation'.*\['test', 'train'\]"):
        read_preference_pairs(fx.path, split="validation")
    one = read_preference_pairs(fx.expected["files"][1])  # a single .parquet file
    assert _texts(one) == fx.expected["texts"][2:]


def test_rlaif_v_original_columns(tmp_path):
    fx = write_trl_parquet(tmp_path / "RLAIF-V-Dataset", layout="rlaif_v", shards=2)
    recs = read_preference_pairs(fx.path)  # no split in the names: all rows are "train"
    assert _texts(recs) == fx.expected["texts"]  # `question` is the prompt
    assert [r.image.load().getpixel((5, 0)) for r in recs] == fx.expected["pixels"]
    assert [r.image_id for r in recs] == [f"rlaifv-{k}" for k in range(4)]
    assert recs[1].meta["origin_dataset"] == "shapes" and recs[1].meta["image_path"] == "imgs/1.jpg"
    with pytest.raises(DataError, match="no split 'test'"):
        read_preference_pairs(fx.path, split="test")


def test_parquet_images_are_not_decoded_when_read(tmp_path, monkeypatch):
    fx = write_trl_parquet(tmp_path, layout="rlaif_v", shards=1)

    def no_decoding(*a, **k):
        raise AssertionError("an image was decoded while reading")

    monkeypatch.setattr(Image, "open", no_decoding)
    recs = read_preference_pairs(fx.path)
    assert len(recs) == 4 and all(isinstance(r.image.data, bytes) for r in recs)


def _write_parquet(path, rows, schema=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_parquet_bad_schema_and_rows_name_file_row_and_column(tmp_path):
    img = {"bytes": make_image(0).tobytes(), "path": None}
    good = {"image": img, "question": "q", "chosen": "a", "rejected": "b"}
    f = _write_parquet(tmp_path / "cols.parquet", [{"image": img, "text": "q", "answer": "a"}])
    with pytest.raises(DataError) as e:
        read_preference_pairs(f)
    msg = str(e.value)
    assert str(f) in msg and "missing column" in msg and "'answer'" in msg and "question" in msg
    f = _write_parquet(tmp_path / "rows.parquet", [good, {**good, "rejected": None}])
    with pytest.raises(DataError, match=r"rows.parquet: row 1: field 'rejected'"):
        read_preference_pairs(f)
    f = _write_parquet(tmp_path / "img.parquet", [good, {**good, "image": None}])
    with pytest.raises(DataError, match=r"img.parquet: row 1: field 'image'"):
        read_preference_pairs(f)
    f = tmp_path / "broken.parquet"
    f.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError, match=r"broken.parquet: cannot read parquet"):
        read_preference_pairs(f)
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(DataError, match="nothing: .*parquet.*save_to_disk"):
        read_preference_pairs(empty)


def test_preference_file_source_reads_parquet(tmp_path):
    from cwdpo.data.sources import PreferenceFileSource

    fx = write_trl_parquet(tmp_path, layout="trl", shards=2)
    src = PreferenceFileSource(str(fx.path), holdout={"val": 1})
    assert [r.references[0] for r in src.captions("train")] == [
        c for _, c, _ in fx.expected["texts"][:3]
    ]
    assert src.captions("val")[0].meta["rejected"] == fx.expected["texts"][3][2]


# ------------------------------------------------------------------------------ EXIF


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_transformers_load_image(tmp_path, orientation):
    from transformers.image_utils import load_image

    path = write_exif_jpeg(tmp_path / f"o{orientation}.jpg", orientation)
    theirs = np.asarray(load_image(str(path)))
    for ref in (ImageRef(path=str(path)), ImageRef(data=path.read_bytes())):
        ours = np.asarray(ref.load())
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs)
        assert probe_image(ref) is None
    # the raw pixels differ from the upright ones for every orientation but 1
    with Image.open(path) as raw:
        raw_px = np.asarray(raw.convert("RGB"))
    assert (raw_px.shape == theirs.shape and np.array_equal(raw_px, theirs)) == (orientation == 1)
    rec = CaptionRecord("x", ImageRef(path=str(path)), ["a"])
    assert check_record_images([rec], ["row 0"], "f.jsonl") == [rec]


# ------------------------------------------------------------------------------ 16-bit


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_16bit_grey_png_loads_mid_grey(tmp_path):
    path = tmp_path / "grey16.png"
    path.write_bytes(_png(grey16(0x8000)))
    with Image.open(path) as f:
        assert f.mode == "I;16"  # PIL's mode for a 16-bit greyscale PNG
    px = np.asarray(ImageRef(path=str(path)).load())
    assert (px == 128).all()  # 0x8000 >> 8, not white (255)
    # a gradient: every value maps to its high byte, as PIL reads 16-bit RGB PNGs
    ramp = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)
    img = Image.frombytes("I;16", (16, 16), ramp.astype("<u2").tobytes())
    out = np.asarray(ImageRef(data=_png(img)).load())
    assert np.array_equal(out[..., 0], (ramp >> 8).astype(np.uint8))
    assert np.array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("value", [0x0000, 0x7FFF, 0x8000, 0xC0DE, 0xFFFF])
def test_16bit_grey_and_16bit_rgb_png_agree(value):
    rgb16 = ImageRef(data=png16_rgb_bytes((value, value, value))).load()
    grey = ImageRef(data=_png(grey16(value))).load()
    assert np.array_equal(np.asarray(rgb16), np.asarray(grey))
    assert np.asarray(grey)[0, 0, 0] == value >> 8


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_modes_in_memory(mode):
    img = grey16(0x8000, mode=mode)
    assert img.mode == mode
    assert (np.asarray(ImageRef(factory=lambda: img).load()) == 128).all()


def test_16bit_pgm_mode_i_file(tmp_path):
    path = tmp_path / "grey16.pgm"
    grey16(0x4000, mode="I").save(path)  # written with maxval 65535
    with Image.open(path) as f:
        assert f.mode == "I"
    assert (np.asarray(ImageRef(path=str(path)).load()) == 0x40).all()


def test_images_without_an_8bit_reading_are_refused_at_read_time(tmp_path):
    big = Image.fromarray(np.full((4, 4), 70000, dtype=np.int32))  # mode I beyond 16 bits
    flt = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))  # mode F
    for img, mode in ((big, "I"), (flt, "F")):
        ref = ImageRef(factory=lambda im=img: im, name=f"row 3 image ({mode})")
        with pytest.raises(DataError) as e:
            ref.load()
        assert "row 3 image" in str(e.value) and f"mode {mode}" in str(e.value)
        assert f"mode {mode}" in (probe_image(ref) or "")
    path = tmp_path / "float.tif"
    flt.save(path)
    rec = CaptionRecord("x", ImageRef(path=str(path)), ["a"])
    with pytest.raises(DataError, match=r"pairs.jsonl: row 0: cannot read image .*float.tif"):
        check_record_images([rec], ["row 0"], "pairs.jsonl")


# ------------------------------------------------------------------------------ models


@pytest.fixture(scope="module")
def text_only_dir(tmp_path_factory, tiny_vlm_path):
    """A tiny LlamaForCausalLM saved with a tokenizer that has no chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("text-only-llama")
    tok = AutoTokenizer.from_pretrained(tiny_vlm_path)
    tok.chat_template = None
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    tok_cfg.pop("processor_class", None)  # a text-only checkpoint names no processor
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return d


def test_text_only_model_is_refused_first_for_what_it_is(text_only_dir, tmp_path):
    from cwdpo.model.backbone import VLMBackbone
    from cwdpo.model.loading import ModelLoadError

    for kwargs in ({}, {"chat_template": "{{ messages }}"}):  # first try and second try
        with pytest.raises(ModelLoadError) as e:
            VLMBackbone.from_pretrained(text_only_dir, **kwargs)
        msg = str(e.value)
        assert str(text_only_dir) in msg and "text-only" in msg and "LlamaForCausalLM" in msg
        assert "image-text-to-text" in msg and "chat template" not in msg
    weights_only = tmp_path / "weights-only"  # no tokenizer saved: still named for what it is
    weights_only.mkdir()
    (weights_only / "config.json").write_text((text_only_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="text-only"):
        VLMBackbone.from_pretrained(weights_only)
