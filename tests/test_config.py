"""Every config group option and experiment composes; typos fail loudly, naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from cwdpo.run.config import CONFIG_DIR
from tests.helpers import compose_cfg

CONF = Path(CONFIG_DIR)
REPO = Path(__file__).resolve().parent.parent
GROUPS = ["model", "data", "stage", "negatives", "trainer", "logger", "callbacks", "paths"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group, tmp_path):
    for opt in options(group):
        cfg = compose_cfg([f"{group}={opt}"], tmp_path, tmp_path)
        # resolve everything except the model path (tiny_vlm would build the model) and
        # mandatory data roots of real datasets (??? until the user sets them)
        cfg.model.path = "x"
        if OmegaConf.is_missing(cfg.data, "root") or OmegaConf.is_missing(cfg.data, "path"):
            continue
        OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("name", options("experiment"))
def test_every_experiment_composes(name, tmp_path):
    cfg = compose_cfg([f"+experiment={name}"], tmp_path, tmp_path)
    assert cfg.experiment_name == name


def test_ablation_cooling_turns_cooling_off_only(tmp_path):
    base = compose_cfg([], tmp_path, tmp_path)
    abl = compose_cfg(["+experiment=ablation_cooling"], tmp_path, tmp_path)
    assert (
        base.stage.cw_dpo.objective.cooling is True and abl.stage.cw_dpo.objective.cooling is False
    )
    a = OmegaConf.to_container(base.stage, resolve=False)
    b = OmegaConf.to_container(abl.stage, resolve=False)
    b["cw_dpo"]["objective"]["cooling"] = True
    assert a == b


def test_debug_fast_shortens_every_stage_and_changes_no_loss_setting(tmp_path):
    """`+debug=fast` is a smoke run of the same method: every stage and the evaluation shrink,
    every other stage setting (the losses, their knobs) is the default run's."""
    base = compose_cfg([], tmp_path, tmp_path)
    fast = compose_cfg(["+debug=fast"], tmp_path, tmp_path)
    for name in base.stage.run:
        assert 0 < fast.stage[name].steps < base.stage[name].steps, name
        # as written (unresolved): the module's `total_steps: ${..steps}` follows `steps`
        rest = OmegaConf.to_container(base.stage[name], resolve=False)
        got = OmegaConf.to_container(fast.stage[name], resolve=False)
        assert {k: v for k, v in got.items() if k != "steps"} == {
            k: v for k, v in rest.items() if k != "steps"
        }, name
    assert 0 < fast.eval.n_records < base.eval.n_records
    assert sum(fast.data.source.sizes.values()) < sum(base.data.source.sizes.values())


@pytest.mark.parametrize(
    "key",
    ["stage.cw_dpo.betta", "data.source.sizes.trian", "trainer.devics", "model.lora.rr", "sed"],
)
def test_unknown_key_fails_naming_it(key, tmp_path):
    """Every node is closed (struct), nested ones too: a typo at any depth names the full key."""
    with pytest.raises(ConfigCompositionException, match=f"Could not override '{re.escape(key)}'"):
        compose_cfg([f"{key}=1"], tmp_path, tmp_path)


@pytest.mark.parametrize("group", GROUPS)
def test_unknown_group_option_fails_naming_group_and_options(group, tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg([f"{group}=nope"], tmp_path, tmp_path)
    msg = str(err.value)
    assert f"Could not find '{group}/nope'" in msg, msg
    listed = msg.split(f"Available options in '{group}':")[1].split("Config search path")[0]
    assert listed.split() == options(group), msg


def test_every_loss_knob_the_readme_names_is_a_config_value(tmp_path):
    """README's "Every loss knob is a config value" list: each key it names exists where it
    says, and a command-line override of it lands in the composed config."""
    readme = " ".join((REPO / "README.md").read_text().split())
    said = readme.split("Every loss knob is a config value")[1].split("(e.g.")[0]
    knobs = [
        f"{node}.{k.strip()}"
        for node, ks in re.findall(r"`(stage\.\w+\.objective)\.\{([\w, ]+)\}`", said)
        for k in ks.split(",")
    ]
    nodes = {k.rsplit(".", 1)[0] for k in knobs}
    assert nodes == {"stage.sft_c.objective", "stage.cw_dpo.objective"}, said
    cfg = compose_cfg([], tmp_path, tmp_path)
    other = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v + 0.5}
    changed = {}
    for knob in knobs:
        value = OmegaConf.select(cfg, knob, throw_on_missing=True)
        changed[knob] = 0.5 if value is None else other.get(type(value), lambda v: v + "_x")(value)
    overrides = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changed.items()]
    moved = compose_cfg(overrides, tmp_path, tmp_path)
    assert {k: OmegaConf.select(moved, k) for k in knobs} == changed
    mixed = compose_cfg(["negatives=mixed", "negatives.dataset_fraction=0.25"], tmp_path, tmp_path)
    assert mixed.negatives.dataset_fraction == 0.25


@pytest.mark.parametrize(
    ("group", "option"),
    [("experiment", "ablation_cooling"), ("debug", "fast"), ("hparams_search", "optuna")],
)
def test_null_default_groups_take_both_spellings(group, option, tmp_path):
    """`experiment=NAME` (in train.yaml's defaults list, as in the lightning-hydra-template)
    and the documented `+experiment=NAME` compose the same config; Hydra alone refuses the
    `+` spelling for a group in the defaults list, cwdpo.train (plain_group_overrides) and
    compose_cfg accept it."""
    from hydra import compose, initialize_config_dir

    from cwdpo.utils.overrides import plain_group_overrides

    plain = compose_cfg([f"{group}={option}"], tmp_path, tmp_path)
    plus = compose_cfg([f"+{group}={option}"], tmp_path, tmp_path)
    assert OmegaConf.to_container(plain) == OmegaConf.to_container(plus)
    assert plain_group_overrides([f"+{group}={option}", "+stage.cw_dpo.x=1"]) == [
        f"{group}={option}",
        "+stage.cw_dpo.x=1",
    ]
    with (
        initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"),
        pytest.raises(ConfigCompositionException, match=f"Multiple values for {group}"),
    ):
        compose("train", overrides=[f"+{group}={option}"])


@pytest.mark.subprocess
def test_cli_takes_experiment_with_and_without_plus(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "CWDPO_CACHE": str(tmp_path)}
    out = []
    for arg in ("experiment=ablation_cooling", "+experiment=ablation_cooling"):
        proc = subprocess.run(
            [sys.executable, "-m", "cwdpo.train", arg, "--cfg", "job"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        out.append(proc.stdout)
    assert out[0] == out[1] and "experiment_name: ablation_cooling" in out[0]


def test_optimized_metric_is_read_from_the_config(tmp_path):
    from cwdpo.run.config_schema import ConfigError
    from cwdpo.run.results import optimized_metric

    assert compose_cfg([], tmp_path, tmp_path).optimized_metric is None
    sweep = compose_cfg(["hparams_search=optuna"], tmp_path, tmp_path)
    assert list(sweep.optimized_metric) == ["fact_accuracy", "cider"]
    res = {"stages": {"start": {"cider": 1.0}, "cw_dpo": {"cider": 2.5, "objective": "cw_dpo"}}}
    assert optimized_metric(res, "cider") == 2.5
    assert optimized_metric(res, None) is None
    with pytest.raises(ConfigError, match=r"optimized_metric='fact_accuracy'.*\['cider'\]"):
        optimized_metric(res, "fact_accuracy")
    # the sweep's list: fact accuracy where the source knows facts, else CIDEr (caption data)
    assert optimized_metric(res, sweep.optimized_metric) == 2.5
    res["stages"]["cw_dpo"]["fact_accuracy"] = 80.0
    assert optimized_metric(res, sweep.optimized_metric) == 80.0
    with pytest.raises(
        ConfigError, match=r"\['bleu_9', 'meteor_9'\].*\['cider', 'fact_accuracy'\]"
    ):
        optimized_metric(res, ["bleu_9", "meteor_9"])


def test_stages_name_their_module_and_data_module(tmp_path):
    from hydra.utils import get_class

    cfg = compose_cfg([], tmp_path, tmp_path)
    for name in ("base_sft", "sft_c", "cw_dpo"):
        st = cfg.stage[name]
        assert get_class(st.module._target_).__name__ == (
            "CWDPOModule" if name == "cw_dpo" else "SFTCModule"
        )
        assert get_class(st.datamodule._target_).__name__ == (
            "PreferenceDataModule" if name == "cw_dpo" else "CaptionDataModule"
        )


def test_shared_defaults_are_written_once(tmp_path):
    """`data.stage_split` comes from conf/data/common for every data option; the eval split and
    sizes from conf/evaluation for both entry points."""
    train = compose_cfg([], tmp_path, tmp_path)
    ev = compose_cfg([], tmp_path, tmp_path, name="eval")
    for k in ("split", "n_records", "batch_size", "max_new_tokens"):
        assert train.eval[k] == ev.eval[k]
    for opt in options("data"):
        cfg = compose_cfg([f"data={opt}"], tmp_path, tmp_path)
        assert dict(cfg.data.stage_split) == {"sft_c": 0.75, "cw_dpo": 0.25}, opt
    assert not [
        o for o in options("data") if "stage_split:" in (CONF / "data" / f"{o}.yaml").read_text()
    ]
