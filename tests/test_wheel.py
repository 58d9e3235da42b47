"""A wheel install runs the main job: the Hydra configs ship inside the package and the console
scripts exist (`pip install git+…` or a built wheel used to stop at "config directory
'…/site-packages/conf' does not exist")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.subprocess
def test_wheel_in_a_fresh_venv_runs_the_main_job(tmp_path, tiny_cache_dir):
    src, dist = tmp_path / "src", tmp_path / "dist"  # built from a copy: pip builds in-tree
    shutil.copytree(REPO / "cwdpo", src / "cwdpo", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    wheel_cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w"]
    _run([*wheel_cmd, str(dist), "--no-build-isolation"])
    wheel = next(dist.glob("cwdpo-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for cfg in (
        "train.yaml",
        "eval.yaml",
        "model/tiny.yaml",
        "stage/cw_dpo.yaml",
        "debug/fast.yaml",
    ):
        assert f"cwdpo/conf/{cfg}" in names, cfg
    assert "cwdpo/metrics/benchmarks/coco_synonyms.txt" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "cwdpo-train = cwdpo.train:cli" in scripts and "cwdpo-eval = cwdpo.eval:main" in scripts

    # A fresh venv without the source tree. Its dependencies come from this interpreter's
    # site-packages through a plain path line (which does not run the editable-install hook
    # there, so `cwdpo` can only come from the wheel).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    Path(site.stdout.strip(), "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"CWDPO_CACHE": str(tiny_cache_dir), "OMP_NUM_THREADS": "1"}
    where = _run([str(py), "-c", "import cwdpo; print(cwdpo.__file__)"], cwd=tmp_path, env=env)
    assert where.stdout.strip().startswith(str(venv)), where.stdout

    run = tmp_path / "run"
    _run(
        [
            str(venv / "bin" / "cwdpo-train"),
            "+debug=fast",
            "num_threads=1",
            f"hydra.run.dir={run}",
            "eval.caption_metrics=false",
            "eval.winrate=false",
        ],
        cwd=tmp_path,
        env=env,
        timeout=900,
    )
    results = json.loads((run / "results.json").read_text())
    assert results["stages"]["cw_dpo"]["steps"] > 0
