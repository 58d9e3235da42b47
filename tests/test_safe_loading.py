"""Safe loading (docs/reliability.md): safetensors weights, `torch.load(weights_only=True)`
only, `trust_remote_code` off unless configured, API keys only from the environment and never
written to any file of a run."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from cwdpo.run.config import CONFIG_DIR

PACKAGE = Path(__file__).resolve().parent.parent / "cwdpo"
UNSAFE_WEIGHTS = (".bin", ".pt", ".pth", ".pkl", ".pickle")


def train_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def _calls(name: str):
    """(file, line, call) for every `<module>.<name>(...)` call in the package."""
    for f in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == name
            ):
                yield f, node.lineno, node


# ----------------------------------------------------------------------------- torch.load
def test_every_torch_load_in_the_package_is_weights_only():
    bad = []
    for f, line, call in _calls("load"):
        if isinstance(call.func.value, ast.Name) and call.func.value.id == "torch":
            kw = {k.arg: k.value for k in call.keywords}
            ok = (
                isinstance(kw.get("weights_only"), ast.Constant)
                and kw["weights_only"].value is True
            )
            if not ok:
                bad.append(f"{f.relative_to(PACKAGE.parent)}:{line}")
    assert not bad, f"torch.load without weights_only=True at {bad}"
    pickles = [
        f"{f.name}:{line}"
        for name in ("loads",)
        for f, line, call in _calls(name)
        if isinstance(call.func.value, ast.Name) and call.func.value.id in ("pickle", "dill")
    ]
    pickles += [
        f"{f.name}:{line}"
        for f, line, call in _calls("load")
        if isinstance(call.func.value, ast.Name) and call.func.value.id in ("pickle", "dill")
    ]
    assert not pickles, f"raw unpickling at {pickles}"


class _Payload:
    marker = ""

    def __reduce__(self):  # unpickling this would create a file: code execution
        return (open, (self.marker, "w"))


def test_checkpoint_loader_refuses_pickled_code(tmp_path):
    from cwdpo.utils.checkpoint_io import AtomicCheckpointIO, UnsafeCheckpointError

    payload = _Payload()
    payload.marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": payload}, path)
    with pytest.raises(UnsafeCheckpointError, match=f"{path}: refused to load"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)  # even when asked
    assert not (tmp_path / "pwned").exists()


def test_pipeline_trainers_use_the_safe_checkpoint_io(tmp_path):
    from cwdpo.run.pipeline import build_trainer
    from cwdpo.utils.checkpoint_io import AtomicCheckpointIO

    cfg = train_cfg(["debug=fast", f"paths.output_dir={tmp_path}"])
    trainer = build_trainer("sft_c", cfg, tmp_path, [])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ----------------------------------------------------------------------------- safetensors
def _weight_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob("*") if p.suffix in UNSAFE_WEIGHTS + (".safetensors",))


def test_weights_are_safetensors_only(tiny_vlm_path, backbone, tmp_path):
    assert _weight_files(Path(tiny_vlm_path)) == ["model.safetensors"]
    backbone.save_pretrained(tmp_path / "saved")
    assert _weight_files(tmp_path / "saved") == ["model.safetensors"]


@pytest.mark.subprocess  # forks CLI runs (test_resume.pipeline_runs)
def test_pipeline_stage_outputs_are_safetensors_only(runs):
    for run in (runs["ref"], runs["run"]):
        for hf in (run / "checkpoints").glob("*_hf"):
            assert _weight_files(hf) == ["model.safetensors"], hf


# ----------------------------------------------------------------------------- remote code
def test_trust_remote_code_is_off_unless_configured(monkeypatch, tiny_vlm_path):
    import transformers

    from cwdpo.model.backbone import VLMBackbone
    from cwdpo.model.loading import load_model_and_processor

    for f in sorted((Path(CONFIG_DIR) / "model").glob("*.yaml")):
        assert yaml.safe_load(f.read_text()).get("trust_remote_code") is False, f.name
    assert train_cfg([]).model.trust_remote_code is False
    import inspect

    for fn in (load_model_and_processor, VLMBackbone.from_pretrained):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False
    seen = []

    def record(name):
        def fake(path, *a, **k):
            seen.append((name, k.get("trust_remote_code")))
            raise RuntimeError("stop here")

        return fake

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", record("processor"))
    for flag in (False, True):
        with pytest.raises(Exception, match="stop here"):
            load_model_and_processor(tiny_vlm_path, trust_remote_code=flag)
    assert seen == [("processor", False), ("processor", True)]
    monkeypatch.undo()
    monkeypatch.setattr(
        transformers.AutoModelForImageTextToText, "from_pretrained", record("model")
    )
    with pytest.raises(Exception, match="stop here"):
        load_model_and_processor(tiny_vlm_path, trust_remote_code=True)
    assert seen[-1] == ("model", True)
    literal = [
        f"{f.name}:{line}"
        for f, line, call in _calls("from_pretrained")
        for k in call.keywords
        if k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value
    ]
    assert not literal, f"hard-coded trust_remote_code=True at {literal}"


# ----------------------------------------------------------------------------- API keys
def test_api_keys_in_the_config_are_refused():
    from cwdpo.run.preflight import check_no_secrets

    for override in (
        "+eval.judge.api_key=sk-abc",
        "+eval.judge.api_key=${oc.env:OPENAI_API_KEY}",
        "+logger.wandb.token=abc",
    ):
        with pytest.raises(ValueError, match="read from the environment only"):
            check_no_secrets(train_cfg([override]))
    check_no_secrets(
        train_cfg(["+eval.judge.api_key_env=OPENAI_API_KEY", "+eval.judge.api_key=null"])
    )


def test_http_judge_never_shows_its_key(monkeypatch):
    from cwdpo.metrics.winrate import HttpJudge

    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret-key")
    judge = HttpJudge(url="http://127.0.0.1:9", model="judge")
    assert "sk-very-secret-key" not in repr(judge) and "sk-very-secret-key" not in str(vars(judge))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_vlm_path):
    from tests.test_resume import pipeline_runs

    return pipeline_runs(tmp_path_factory, Path(tiny_vlm_path).parent)


@pytest.mark.subprocess  # forks CLI runs (test_resume.pipeline_runs)
def test_api_keys_from_the_environment_reach_no_file_of_a_run(runs):
    """Every pipeline run of tests/test_resume.py had OPENAI_API_KEY / WANDB_API_KEY / HF_TOKEN
    set: no file it wrote (configs, .hydra, logs, CSV, results, checkpoints) contains it."""
    from tests.test_resume import SECRET

    files = [p for p in runs["root"].rglob("*") if p.is_file()]
    assert len(files) > 20 and any(p.name == "config.yaml" for p in files)
    assert any(p.suffix == ".wandb" for p in files)  # the reference run logged to W&B (offline)
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked, f"API key written to {leaked}"
    assert SECRET not in os.environ.get("OPENAI_API_KEY", "")  # only the forked runs had it
