"""Images are checked when data is read (docs/reliability.md, issue #15): a truncated JPEG in
COCO-Karpathy data is an error naming the annotation file, row and image path before any
training — or, with `data.source.skip_bad_images=true`, a counted skip. Tiny fixtures only."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import hydra
import pytest

from cwdpo.data.records import DataError
from tests.formats import write_karpathy, write_nocaps, write_trl_jsonl
from tests.helpers import compose_cfg


def truncate(path: Path) -> Path:
    """Cut a valid JPEG in half: the header parses, decoding fails ("Truncated File Read")."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def coco_with_truncated_jpeg(tmp_path: Path):
    fx = write_karpathy(tmp_path / "coco", "coco")
    row = fx.rows[1]  # a train row
    bad = truncate(fx.image_root / row["filepath"] / row["filename"])
    return fx, bad


def coco_source(fx, tmp_path: Path, *overrides: str):
    """`data=coco_karpathy` exactly as `cwdpo.train` builds it."""
    cfg = compose_cfg(
        [
            "data=coco_karpathy",
            f"data.root={fx.path.parent}",
            f"data.source.image_root={fx.image_root}",
            *overrides,
        ],
        tmp_path / "out",
        tmp_path / "cache",
    )
    return hydra.utils.instantiate(cfg.data.source)


def test_truncated_jpeg_is_an_error_naming_file_row_and_image(tmp_path):
    fx, bad = coco_with_truncated_jpeg(tmp_path)
    with pytest.raises(DataError) as err:
        coco_source(fx, tmp_path).captions("train")  # what run_pipeline does before training
    msg = str(err.value)
    assert msg.startswith(f"{fx.path}: images[1] (imgid=1): cannot read image {bad}: ")
    assert "Truncated" in msg and "data.source.skip_bad_images=true" in msg


def test_skip_bad_images_skips_and_counts_an_unreadable_image(tmp_path, caplog):
    from cwdpo.data.karpathy import read_karpathy

    fx, bad = coco_with_truncated_jpeg(tmp_path)
    with caplog.at_level(logging.WARNING):
        recs = coco_source(fx, tmp_path, "data.source.skip_bad_images=true").captions("train")
    assert str(bad) not in {r.image.path for r in recs} and len(recs) == 3  # train + restval - 1
    assert "skipped 1 rows with unreadable images" in caplog.text
    stats: dict[str, int] = {}
    read_karpathy(fx.path, fx.image_root, skip_bad_images=True, check_images=True, stats=stats)
    assert stats == {"skipped_bad_image": 1, "records": 3}
    for r in recs:
        r.image.load()  # every record kept decodes


def test_nocaps_images_are_checked_too(tmp_path):
    from cwdpo.data.nocaps import read_nocaps

    fx = write_nocaps(tmp_path)
    bad = truncate(fx.image_root / fx.rows[2]["file_name"])
    with pytest.raises(DataError, match=rf"images\[2\] \(id=.*\): cannot read image {bad}"):
        read_nocaps(fx.path, fx.image_root, check_images=True)
    stats: dict[str, int] = {}
    assert (
        len(
            read_nocaps(
                fx.path, fx.image_root, check_images=True, skip_bad_images=True, stats=stats
            )
        )
        == 5
    )
    assert stats["skipped_bad_image"] == 1


def test_images_are_decoded_in_a_bounded_pool(monkeypatch):
    from cwdpo.data import image_check
    from cwdpo.data.records import ImageRef

    active, peak, lock = [0], [0], threading.Lock()
    together = threading.Barrier(4, timeout=60)  # passes only when 4 probes run at once

    def probe(ref):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        together.wait()  # no sleep: the pool must hold 4 decodes in flight to get past here
        with lock:
            active[0] -= 1
        return "bad" if ref.name == "r7" else None

    monkeypatch.setattr(image_check, "probe_image", probe)
    monkeypatch.setattr(image_check.os, "cpu_count", lambda: 8)  # the bound, not the machine
    refs = [ImageRef(path=f"/x/{i}.jpg", name=f"r{i}") for i in range(40)]
    assert image_check.unreadable_images(refs, max_workers=4) == {7: "bad"}
    assert peak[0] == 4  # 4 in parallel, never a 5th


def test_trl_pair_images_are_checked_too(tmp_path):
    from cwdpo.data.sources import PreferenceFileSource

    fx = write_trl_jsonl(tmp_path)
    bad = truncate_png(fx.expected["images"][2])
    hold = {"val": 1}
    with pytest.raises(
        DataError, match=rf"{fx.path}: row 2 \(img_2.png\): cannot read image {bad}"
    ):
        PreferenceFileSource(str(fx.path), str(fx.image_root), holdout=hold)
    src = PreferenceFileSource(str(fx.path), str(fx.image_root), holdout=hold, skip_bad_images=True)
    assert len(src.captions("train")) + len(src.captions("val")) == 3


def truncate_png(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path
