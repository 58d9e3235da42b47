"""Failures a cluster run meets, each said in one line (docs/reliability.md, "Interruptions and
legible failures"): a changed training value on resume (refused unless `resume_overrides=allow`,
then recorded), a corrupt checkpoint (its path and what to do), a full disk (ENOSPC anywhere in
the cause chain → "no space left on <dir> while writing <what>", the old file intact).
The end-to-end versions (a real process) are in tests/test_preemption.py."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from hydra.errors import CompactHydraException
from omegaconf import OmegaConf

from tests.helpers import compose_cfg


# ----------------------------------------------------------------------------- resume overrides
def _started(tmp_path: Path, cache: Path) -> Path:
    """A run dir whose config.json is the default config, as a first attempt wrote it."""
    from cwdpo.run.pipeline import dump_config

    run = tmp_path / "run"
    cfg = compose_cfg([], run, cache)
    run.mkdir(parents=True)
    dump_config(cfg, run)
    (run / "attempts.json").write_text(json.dumps([{"start": 1.0, "end": 2.0}]))
    return run


def _resumed(tmp_path: Path, run: Path, overrides: list[str], cache: Path):
    """The config a resume composes: another Hydra dir and log dir."""
    cfg = compose_cfg(
        [*overrides, f"resume={run}", f"paths.log_dir={tmp_path / 'elsewhere'}"],
        tmp_path / "other-hydra-dir",
        cache,
    )
    from cwdpo.run.pipeline import resolve_resume

    resolve_resume(cfg)
    return cfg


def test_a_changed_training_value_is_refused_naming_old_and_new(tmp_path, tiny_cache_dir):
    from cwdpo.run.config_schema import ConfigError
    from cwdpo.run.preflight import check_config_changes

    run = _started(tmp_path, tiny_cache_dir)
    cfg = _resumed(
        tmp_path, run, ["stage.cw_dpo.objective.beta=0.5", "data.batch_size=2"], tiny_cache_dir
    )
    with pytest.raises(ConfigError) as err:
        check_config_changes(cfg, run)
    msg = str(err.value)
    assert "stage.cw_dpo.objective.beta: 0.1 → 0.5" in msg and "data.batch_size: 16 → 2" in msg
    assert "resume_overrides=allow" in msg and str(run) in msg
    assert "paths" not in msg.replace(str(run), "")  # other dirs are no change
    assert isinstance(err.value, CompactHydraException)  # the CLI prints this one line


def test_path_only_differences_are_no_change(tmp_path, tiny_cache_dir):
    """Another cache dir moves `model.path` (built there by the resolver): a path, no change."""
    from cwdpo.run.preflight import check_config_changes

    run = _started(tmp_path, tiny_cache_dir)
    assert check_config_changes(_resumed(tmp_path, run, [], tmp_path / "other-cache"), run) == {}


def test_allowed_changes_are_recorded_in_config_history_and_results(tmp_path, tiny_cache_dir):
    from cwdpo.run.preflight import check_config_changes, record_config_changes
    from cwdpo.run.results import finish_results

    run = _started(tmp_path, tiny_cache_dir)
    overrides = ["stage.cw_dpo.objective.beta=0.5", "resume_overrides=allow"]
    cfg = _resumed(tmp_path, run, overrides, tiny_cache_dir)
    changes = check_config_changes(cfg, run)
    assert changes == {"stage.cw_dpo.objective.beta": [0.1, 0.5]}
    record_config_changes(run, cfg, changes)
    # The config files say what the run trains with now; the old one is kept, per attempt.
    assert (
        json.loads((run / "config.json").read_text())["stage"]["cw_dpo"]["objective"]["beta"] == 0.5
    )
    assert OmegaConf.load(run / "config.yaml").stage.cw_dpo.objective.beta == 0.5
    hist = run / "config_history"
    assert OmegaConf.load(hist / "attempt_1.yaml").stage.cw_dpo.objective.beta == 0.1
    assert json.loads((hist / "attempt_2.changes.json").read_text()) == {
        "attempt": 2,
        "changes": {"stage.cw_dpo.objective.beta": [0.1, 0.5]},
    }
    results = {"stages": {"start": {"fact_accuracy": 1.0}}}
    finish_results(results, run, 0.0, [1.0])
    saved = json.loads((run / "results.json").read_text())
    assert saved["config_changes"] == {"2": {"stage.cw_dpo.objective.beta": [0.1, 0.5]}}


def test_resume_overrides_is_validated(tmp_path):
    from cwdpo.run.config_schema import ConfigError, validate_config

    cfg = compose_cfg(["resume_overrides=yes"], tmp_path / "o", tmp_path / "c")
    with pytest.raises(ConfigError, match=r"resume_overrides='yes': expected one of"):
        validate_config(cfg)


# ----------------------------------------------------------------------------- corrupt checkpoint
@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_a_truncated_checkpoint_names_its_path_and_what_to_do(tmp_path, keep):
    from cwdpo.utils.checkpoint_io import AtomicCheckpointIO, CorruptCheckpointError

    path = tmp_path / "checkpoints" / "cw_dpo" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(10_000.0)}, path)
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    with pytest.raises(CorruptCheckpointError) as err:
        AtomicCheckpointIO().load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    assert "delete it" in msg and "restart stage cw_dpo" in msg
    assert isinstance(err.value, CompactHydraException)


# ----------------------------------------------------------------------------- disk full
class _FullDisk:
    """A file object that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, b) -> int:
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def _disk_fills(monkeypatch, room: int) -> None:
    import cwdpo.utils.io as io

    real = os.fdopen
    monkeypatch.setattr(io.os, "fdopen", lambda fd, mode: _FullDisk(real(fd, mode), room))


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    from cwdpo.utils.checkpoint_io import AtomicCheckpointIO, safe_torch_load
    from cwdpo.utils.io import DiskFullError

    path = tmp_path / "checkpoints" / "sft_c" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(3)}, path)
    _disk_fills(monkeypatch, room=100)
    with pytest.raises(DiskFullError) as err:
        AtomicCheckpointIO().save_checkpoint({"w": torch.ones(100_000)}, path)
    # torch raised "RuntimeError: [enforce fail ...] unexpected pos ..." with ENOSPC as context
    assert isinstance(err.value.__cause__, RuntimeError)
    assert str(err.value) == f"no space left on {path.parent} while writing {path.name}"
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, CompactHydraException)
    assert torch.equal(safe_torch_load(path)["w"], torch.zeros(3))  # the old file, intact
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left


def test_disk_full_while_writing_results_or_hf_weights_is_one_line(tmp_path, monkeypatch):
    from cwdpo.utils.io import DiskFullError, atomic_save_dir, atomic_write_json

    atomic_write_json(tmp_path / "results.json", {"old": 1})
    _disk_fills(monkeypatch, room=0)
    with pytest.raises(DiskFullError, match=f"^no space left on {tmp_path} while writing results"):
        atomic_write_json(tmp_path / "results.json", {"new": 2})
    assert json.loads((tmp_path / "results.json").read_text()) == {"old": 1}

    def save(d: Path) -> None:  # as save_pretrained fails on a full disk
        (d / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device", str(d / "model.safetensors"))

    with pytest.raises(DiskFullError, match="while writing sft_c_hf"):
        atomic_save_dir(tmp_path / "sft_c_hf", save)
    assert not list(tmp_path.glob(".sft_c_hf*"))  # the temp dir is gone


# ----------------------------------------------------------------------------- run outcome
def test_a_signal_outside_training_stops_with_the_resume_line_and_its_exit_code(tmp_path, capsys):
    """SIGTERM while evaluating or saving (no training loop to finish the step): no checkpoint,
    but the same marker and line, and rc 143 — not 0, not a traceback."""
    import signal

    from cwdpo.run.outcome import run_outcome
    from cwdpo.utils.signals import MARKER, install_signal_handlers

    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})
    restore = install_signal_handlers()
    try:
        with pytest.raises(SystemExit) as ex, run_outcome(cfg):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises `Interrupted` outside fit
            for _ in range(1000):  # ... at the next bytecode
                pass
    finally:
        restore()
    assert ex.value.code == 128 + signal.SIGTERM
    marker = json.loads((tmp_path / MARKER).read_text())
    assert marker["signal"] == "SIGTERM" and marker["checkpoint"] is None
    assert marker["resume"] == f"python -m cwdpo.train resume={tmp_path}"
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err.startswith("run stopped: SIGTERM; no checkpoint at this point")
        and marker["resume"] in err
    )
