"""`trainer=deepspeed` (ZeRO-2) and its ZeRO-3 / offload variants: the config Lightning builds
from ours is valid under the installed DeepSpeed's own schema (its pydantic models), so a typo
or an unsupported value fails here rather than after a cluster job has started."""

from __future__ import annotations

import pytest

deepspeed = pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")

VARIANTS = {
    "zero2": [],
    "zero3": ["trainer.strategy.stage=3"],
    "zero3_offload": [
        "trainer.strategy.stage=3",
        "trainer.strategy.offload_optimizer=true",
        "trainer.strategy.offload_parameters=true",
    ],
}


def _strategy(overrides: list[str]):
    import hydra
    from hydra import compose, initialize_config_dir

    from cwdpo.run.config import CONFIG_DIR

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["trainer=deepspeed", *overrides])
    return hydra.utils.instantiate(cfg.trainer.strategy)


def _validate(ds_config: dict, micro_batch: int = 4):
    """DeepSpeed's own parse of the whole config, as `deepspeed.initialize` does it (Lightning
    adds the micro batch size at setup)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig({**ds_config, "train_micro_batch_size_per_gpu": micro_batch})


@pytest.mark.parametrize("name", list(VARIANTS))
def test_deepspeed_configs_pass_deepspeeds_schema(name):
    strategy = _strategy(VARIANTS[name])
    ds = strategy.config
    zero = ds["zero_optimization"]
    expected = 3 if "zero3" in name else 2
    assert zero["stage"] == expected
    if name == "zero3_offload":
        assert zero["offload_optimizer"]["device"] == "cpu"
        assert zero["offload_param"]["device"] == "cpu"
    parsed = _validate(ds)
    assert parsed.zero_optimization_stage == expected
    if name == "zero3_offload":
        assert parsed.zero_config.offload_param.device == "cpu"


def test_the_schema_check_rejects_what_deepspeed_would():
    """The validation above is DeepSpeed's, not a formality: a wrong offload device fails."""
    from pydantic import ValidationError

    ds = _strategy(VARIANTS["zero3_offload"]).config
    ds["zero_optimization"]["offload_param"]["device"] = "gpu"
    with pytest.raises(ValidationError, match="offload_param"):
        _validate(ds)
    ds = _strategy([]).config
    ds["zero_optimization"]["stage"] = 5
    with pytest.raises(ValidationError, match="stage"):
        _validate(ds)
