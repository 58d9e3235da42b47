"""Every config group option and experiment composes; typos fail loudly, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from cwdpo.run.config import CONFIG_DIR
from tests.helpers import compose_cfg

CONF = Path(CONFIG_DIR)
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


def test_debug_and_hparams_groups_compose(tmp_path):
    cfg = compose_cfg(["+debug=fast"], tmp_path, tmp_path)
    assert cfg.stage.cw_dpo.steps == 2


def test_unknown_key_fails_naming_it(tmp_path):
    with pytest.raises(ConfigCompositionException, match="stage.cw_dpo.betta"):
        compose_cfg(["stage.cw_dpo.betta=0.2"], tmp_path, tmp_path)


def test_unknown_group_option_fails_naming_group(tmp_path):
    with pytest.raises(ConfigCompositionException, match="model"):
        compose_cfg(["model=nope"], tmp_path, tmp_path)


def test_every_loss_knob_is_a_config_value(tmp_path):
    cfg = compose_cfg([], tmp_path, tmp_path)
    for k in ("lam", "margin_c", "reduction", "label_smoothing", "constraint"):
        assert k in cfg.stage.sft_c.objective
    for k in ("beta", "cooling", "floor", "tau", "filter_threshold", "loss_type", "rpo_alpha"):
        assert k in cfg.stage.cw_dpo.objective
    assert 0.0 <= cfg.negatives.dataset_fraction <= 1.0


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
            cwd=CONF.parent,
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
