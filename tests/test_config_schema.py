"""Every config value is validated before any model loads (docs/reliability.md, issue #15).

Each bad value of the issue's table fails in `validate_config` — called first thing by
`cwdpo.train` — with one line naming the full key, the value and the allowed range; legal but
suspicious values warn. All of these compose a config only (no model, no data): < 1 s each.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cwdpo.run.config_schema import ConfigError, rules_for, validate_config
from tests.helpers import compose_cfg

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def cfg_of(overrides: list[str], tmp_path: Path):
    return compose_cfg(overrides, tmp_path / "out", tmp_path / "cache")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            ["stage.cw_dpo.objective.beta=-1"],
            r"stage\.cw_dpo\.objective\.beta=-1: expected a number > 0 \(β",
        ),
        (
            ["stage.cw_dpo.objective.tau=0"],
            r"stage\.cw_dpo\.objective\.tau=0: expected a number > 0 \(τ",
        ),
        (
            ["negatives=mixed", "negatives.dataset_fraction=1.5"],
            r"negatives\.dataset_fraction=1\.5: expected a number in \[0, 1\]",
        ),
        (["stage.cw_dpo.steps=-3"], r"stage\.cw_dpo\.steps=-3: expected an integer >= 0"),
        (["data.batch_size=0"], r"data\.batch_size=0: expected an integer >= 1"),
        (
            ["stage.sft_c.objective.label_smoothing=1.0"],
            r"stage\.sft_c\.objective\.label_smoothing=1\.0: expected a number in \[0, 1\)",
        ),
        (["stage.sft_c.optimizer.lr=0"], r"stage\.sft_c\.optimizer\.lr=0: expected a number > 0"),
        (
            ["negatives=self_judged", "negatives.easy_mix=1.5"],
            r"negatives\.easy_mix=1\.5: expected a number in \[0, 1\]",
        ),
        (
            ["stage.cw_dpo.objective.loser_weight=-0.5"],
            r"stage\.cw_dpo\.objective\.loser_weight=-0\.5: expected a number in \[0, 1\]",
        ),
        (
            ["data=shapes_cooc", "data.source.judge=gpt"],
            r"data\.source\.judge='gpt': expected one of",
        ),
        (
            ["stage.cw_dpo.objective.loss_type=hinge"],
            r"stage\.cw_dpo\.objective\.loss_type='hinge': expected one of \['sigmoid', 'ipo', 'sft'\]",
        ),
        (
            ["stage.cw_dpo.objective.floor=median"],
            r"stage\.cw_dpo\.objective\.floor='median': expected a number, or one of \['mean'\]",
        ),
        (["stage.base_sft.steps=2.5"], r"stage\.base_sft\.steps=2\.5: expected an integer >= 0"),
        (["faults.policy=ignore"], r"faults\.policy='ignore'"),
        (
            ["data.stage_split={sft_c: 0.9, cw_dpo: 0.5}"],
            r"data\.stage_split=.* sum to a value in \(0, 1\]",
        ),
        (["negatives.dataset_fraction=0.5"], r"only negatives=mixed takes a blend"),
    ],
)
def test_bad_values_are_refused_naming_key_value_and_range(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as err:
        validate_config(cfg_of(override, tmp_path))
    assert "\n" not in str(err.value)


def test_all_errors_are_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        validate_config(cfg_of(["stage.cw_dpo.objective.beta=-1", "data.batch_size=0"], tmp_path))
    assert "stage.cw_dpo.objective.beta=-1" in str(err.value) and "data.batch_size=0" in str(
        err.value
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["stage.cw_dpo.steps=0"], r"stage\.cw_dpo\.steps=0: stage cw_dpo will train no step"),
        (
            ["stage.cw_dpo.optimizer.lr=0.1"],
            r"stage\.cw_dpo\.optimizer\.lr=0\.1 is far outside the usual range",
        ),
        (["stage.base_sft.optimizer.lr=1e-9"], r"optimizer\.lr=1e-09 .* expect no learning"),
    ],
)
def test_suspicious_values_warn(override, message, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="cwdpo.run.config_schema"):
        warnings = validate_config(cfg_of(override, tmp_path))
    assert any(re.search(message, w) for w in warnings), warnings
    assert any(re.search(message, r.getMessage()) for r in caplog.records)


def test_a_skipped_stage_with_zero_steps_does_not_warn(tmp_path):
    assert (
        validate_config(cfg_of(["stage.base_sft.steps=0", "stage.skip=[base_sft]"], tmp_path)) == []
    )


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_shipped_experiment_is_valid_without_warnings(name, tmp_path):
    assert validate_config(cfg_of([f"+experiment={name}"], tmp_path)) == []


@pytest.mark.parametrize("group", ["model", "data", "negatives", "trainer", "stage", "callbacks"])
def test_every_shipped_group_option_is_valid(group, tmp_path):
    for opt in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        validate_config(cfg_of([f"{group}={opt}"], tmp_path))


def test_schema_covers_every_loss_knob():
    """The schema's objective keys are the objective dataclasses' fields, with their rules:
    derived from the dataclass, so a new field is checked before a model loads."""
    import dataclasses

    from cwdpo.losses.config import PreferenceConfig, SFTCConfig, objective_rules
    from cwdpo.run.config_schema import STAGE_COMMON
    from cwdpo.run.stage_nodes import objective_keys

    keys = set(rules_for("train"))
    for name, cls in (
        ("base_sft", SFTCConfig),
        ("sft_c", SFTCConfig),
        ("cw_dpo", PreferenceConfig),
    ):
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields and fields == set(objective_rules(cls))  # every field carries a rule
        assert {f"stage.{name}.objective.{f}" for f in fields} <= keys
        assert {f"stage.{name}.{k}" for k in STAGE_COMMON} <= keys
        assert objective_keys(name) == {
            f"objective.{k}": r for k, r in objective_rules(cls).items()
        }
    assert {"data.batch_size", "negatives.dataset_fraction", "negatives.easy_fraction"} <= keys


@pytest.mark.parametrize("cls_name", ["PreferenceConfig", "SFTCConfig"])
def test_schema_and_dataclass_refuse_the_same_values(cls_name, tmp_path):
    """One rule per knob: each value the schema refuses under `stage.<name>.objective.<k>`
    the dataclass refuses too, naming the same field (and a legal value passes both)."""
    import cwdpo.losses.config as lc
    from cwdpo.losses.config import objective_rules

    cls = getattr(lc, cls_name)
    stage = "cw_dpo" if cls_name == "PreferenceConfig" else "sft_c"
    bad = {"beta": 0, "tau": -1.0, "loser_weight": 1.5, "filter_threshold": 0.5, "rpo_alpha": -1,
           "loss_type": "kto", "floor": "median", "cooling": "yes", "shuffle_weights": 1,
           "lam": -0.1, "margin_c": -1.0, "reduction": "none", "label_smoothing": 1.0,
           "constraint": "medium"}  # fmt: skip
    for k in objective_rules(cls):
        with pytest.raises(ValueError, match=rf"stage\.\w+\.objective\.{k}="):
            cls(**{k: bad[k]})
        override = f"stage.{stage}.objective.{k}={bad[k]}"
        with pytest.raises(ConfigError, match=rf"stage\.{stage}\.objective\.{k}="):
            validate_config(cfg_of([override], tmp_path))
    assert validate_config(cfg_of([], tmp_path)) == []


def test_eval_config_is_validated(tmp_path):
    cfg = compose_cfg(["eval.batch_size=0"], tmp_path / "out", tmp_path / "cache", name="eval")
    with pytest.raises(ConfigError, match=r"eval\.batch_size=0: expected an integer >= 1"):
        validate_config(cfg, "eval")
    cfg = compose_cfg(
        ["eval.tasks=[captioning,vqa]"], tmp_path / "out", tmp_path / "cache", name="eval"
    )
    with pytest.raises(ConfigError, match=r"eval\.tasks\[1\]='vqa'"):
        validate_config(cfg, "eval")


@pytest.mark.subprocess
def test_cli_prints_one_line_before_any_model_loads(tmp_path):
    """`python -m cwdpo.train stage.cw_dpo.objective.beta=-1`: rc 1, the error on one line, no traceback
    (HYDRA_FULL_ERROR=1 shows it), and the tiny VLM was never built (no model loaded)."""
    cache = tmp_path / "cache"
    env = {**os.environ, "CWDPO_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [
        sys.executable,
        "-m",
        "cwdpo.train",
        "stage.cw_dpo.objective.beta=-1",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1
    lines = [
        ln
        for ln in proc.stderr.splitlines()
        if "stage.cw_dpo.objective.beta" in ln and "expected" in ln
    ]
    assert lines == [
        "config error: stage.cw_dpo.objective.beta=-1: expected a number > 0 "
        "(β, the DPO inverse temperature)"
    ]
    assert "Traceback" not in proc.stderr
    assert not cache.exists() or not any(cache.iterdir())
    full = subprocess.run(
        cmd,
        env={**env, "HYDRA_FULL_ERROR": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert full.returncode == 1 and "Traceback" in full.stderr and "ConfigError" in full.stderr


def test_unknown_stage_key_is_refused_before_any_model_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"stage\.cw_dpo has unknown key\(s\) \['betaa'\]"):
        validate_config(cfg_of(["+stage.cw_dpo.betaa=0.2"], tmp_path))
    with pytest.raises(ConfigError, match=r"stage\.sft_c\.module\._target_='cwdpo\.stages\.Nope'"):
        validate_config(cfg_of(["stage.sft_c.module._target_=cwdpo.stages.Nope"], tmp_path))
    # each node of the stage takes the keys of the class it names, nothing else
    for override, message in (
        ("+stage.cw_dpo.objective.betaa=0.2", r"stage\.cw_dpo\.objective has unknown key\(s\) \['betaa'\]"),
        ("+stage.cw_dpo.module.beta=0.2", r"stage\.cw_dpo\.module has unknown key\(s\) \['beta'\]"),
        ("+stage.sft_c.datamodule.gentle=true", r"stage\.sft_c\.datamodule has unknown key\(s\) \['gentle'\]"),
        ("stage.cw_dpo.objective._target_=cwdpo.Nope", r"stage\.cw_dpo\.objective\._target_='cwdpo\.Nope'"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            validate_config(cfg_of([override], tmp_path))
    # what no single-key rule sees: the objective's own check, also before any model loads
    with pytest.raises(
        ConfigError, match=r"stage\.cw_dpo\.objective\.shuffle_weights needs cooling"
    ):
        validate_config(
            cfg_of(
                ["+experiment=cw_dpo_shuffled", "stage.cw_dpo.objective.cooling=false"], tmp_path
            )
        )
