"""Numerical faults (docs/reliability.md): a NaN injected into one batch (or one gradient) is
detected; `faults.policy=skip` leaves weights and optimizer state untouched and counts the step,
`faults.policy=stop` saves a checkpoint and raises an error that says what and where."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from cwdpo.callbacks.faults import NonFiniteError, NonFiniteGuard, reliability_callbacks
from tests.helpers import cpu_trainer, shapes_sft


class NaNPixels(L.Callback):
    """Fault injection: NaN pixel values in the batches of the given (0-based) steps."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            batch.inputs["pixel_values"].fill_(float("nan"))


class NaNGrad(L.Callback):
    """Fault injection: a finite loss but one NaN gradient entry at the given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            p = next(p for p in pl_module.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("nan")


class Snapshots(L.Callback):
    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append(
            {k: v.detach().clone() for k, v in pl_module.backbone.model.state_dict().items()}
        )


def train(
    path, tmp_path, callbacks: list[L.Callback], steps: int = 3, enable_checkpointing: bool = False
) -> tuple[L.Trainer, Any]:
    from cwdpo.model.backbone import VLMBackbone
    from cwdpo.utils.checkpoint_io import AtomicCheckpointIO

    torch.manual_seed(0)
    backbone = VLMBackbone.from_pretrained(path, max_length=128)
    sizes = {"train": 8, "val": 2, "test": 2, "probe": 2}
    module, dm = shapes_sft(backbone, sizes, steps, lr=1e-3, batch_size=2)
    trainer = cpu_trainer(
        tmp_path,
        steps,
        callbacks,
        enable_checkpointing=enable_checkpointing,
        gradient_clip_val=1.0,
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, datamodule=dm)
    return trainer, module


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_without_a_guard_one_nan_batch_destroys_the_weights(tiny_vlm_path, tmp_path):
    snaps = Snapshots()
    train(tiny_vlm_path, tmp_path, [NonFiniteGuard(policy="off"), NaNPixels({1}), snaps])
    assert not all(torch.isfinite(v).all() for v in snaps.weights[-1].values())


def test_skip_policy_drops_the_update_and_counts_it(tiny_vlm_path, tmp_path):
    guard, snaps = NonFiniteGuard(policy="skip", stage="sft_c"), Snapshots()
    trainer, module = train(tiny_vlm_path, tmp_path, [guard, NaNPixels({1}), snaps])
    w = snaps.weights
    assert _same(w[1], w[0])  # the NaN step changed nothing
    assert not _same(w[2], w[1])  # training went on
    assert all(torch.isfinite(v).all() for v in w[-1].values())
    assert guard.skipped == 1 and trainer.global_step == 3
    assert float(trainer.callback_metrics["faults/skipped_steps"]) == 1.0
    opt = trainer.optimizers[0]
    steps = {int(s["step"]) for s in opt.state.values()}
    assert steps == {2}  # AdamW moments/step count untouched by the skipped step


def test_skip_policy_catches_a_nonfinite_gradient_with_a_finite_loss(tiny_vlm_path, tmp_path):
    guard, snaps = NonFiniteGuard(policy="skip"), Snapshots()
    train(tiny_vlm_path, tmp_path, [guard, NaNGrad(step=1), snaps])
    assert guard.skipped == 1 and _same(snaps.weights[1], snaps.weights[0])


def test_stop_policy_saves_a_checkpoint_and_names_the_fault(tiny_vlm_path, tmp_path):
    from cwdpo.utils.checkpoint_io import safe_torch_load

    snaps = Snapshots()
    with pytest.raises(NonFiniteError) as err:
        train(
            tiny_vlm_path,
            tmp_path,
            [NonFiniteGuard(policy="stop", stage="sft_c"), NaNPixels({1}), snaps],
        )
    msg = str(err.value)
    assert "stage sft_c, step 2: non-finite loss (nan)" in msg and "faults.policy=skip" in msg
    ckpt = tmp_path / "checkpoints" / "sft_c" / "nonfinite-step=2.ckpt"
    assert str(ckpt) in msg and ckpt.is_file()
    state = safe_torch_load(ckpt)
    assert state["global_step"] == 1
    weights = {k.removeprefix("backbone.model."): v for k, v in state["state_dict"].items()}
    assert _same(snaps.weights[0], weights)  # the last good weights, not the NaN update


def test_stop_message_names_the_checkpoint_that_exists_and_the_exact_resume_command(
    tiny_vlm_path, tmp_path
):
    """The old message advised `resume=true` (which started a fresh run elsewhere) from "the
    last periodic checkpoint" (which did not exist yet) and "set faults.policy=skip" (also when
    it already was). Now each claim is true, in both cases."""
    with pytest.raises(NonFiniteError) as err:  # no periodic checkpoint yet
        train(
            tiny_vlm_path, tmp_path, [NonFiniteGuard(policy="stop", stage="sft_c"), NaNPixels({1})]
        )
    msg = str(err.value)
    assert (
        f"Resume with `python -m cwdpo.train resume={tmp_path}`: it restarts stage sft_c from "
        "its start: no periodic checkpoint exists yet" in msg
    )
    assert "resume=true" not in msg and "stage.sft_c.optimizer.lr (now 0.001)" in msg
    assert "faults.policy=skip to skip such steps" in msg  # policy=stop: skipping is an option

    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpts = tmp_path / "checkpoints" / "sft_c"
    every_step = ModelCheckpoint(
        dirpath=str(ckpts), save_last=True, save_top_k=0, every_n_train_steps=1
    )
    with pytest.raises(NonFiniteError) as err:
        train(
            tiny_vlm_path,
            tmp_path,
            [NonFiniteGuard(policy="stop", stage="sft_c"), NaNPixels({2}), every_step],
            enable_checkpointing=True,
        )
    msg = str(err.value)
    assert (ckpts / "last.ckpt").is_file()
    assert (
        f"continues stage sft_c from its last periodic checkpoint {ckpts / 'last.ckpt'} (after step 2)"
        in msg
    )

    guard = NonFiniteGuard(policy="skip", max_consecutive_skips=1, stage="sft_c")
    with pytest.raises(NonFiniteError) as err:  # policy=skip escalated: no advice to set it
        train(tiny_vlm_path, tmp_path / "skip", [guard, NaNPixels({0, 1, 2})])
    msg = str(err.value)
    assert "2 non-finite steps in a row (faults.policy=skip, faults.max_consecutive_skips=1)" in msg
    assert (
        "to skip such steps" not in msg and "a higher faults.max_consecutive_skips (now 1)" in msg
    )


def test_stop_policy_names_the_parameter_with_a_nonfinite_gradient(tiny_vlm_path, tmp_path):
    with pytest.raises(
        NonFiniteError, match=r"non-finite gradients in 1 parameter\(s\): backbone\.model\."
    ):
        train(tiny_vlm_path, tmp_path, [NonFiniteGuard(policy="stop"), NaNGrad(step=0)], steps=1)


def test_too_many_skips_in_a_row_stop(tiny_vlm_path, tmp_path):
    guard = NonFiniteGuard(policy="skip", max_consecutive_skips=1)
    with pytest.raises(NonFiniteError, match="2 non-finite steps in a row"):
        train(tiny_vlm_path, tmp_path, [guard, NaNPixels({0, 1, 2})])
    assert guard.skipped == 1


def test_policy_comes_from_config_and_is_validated():
    cfg = OmegaConf.create(
        {"faults": {"policy": "stop", "check_grads": False, "max_consecutive_skips": 3}}
    )
    guard = next(
        cb for cb in reliability_callbacks("cw_dpo", cfg) if isinstance(cb, NonFiniteGuard)
    )
    assert (guard.policy, guard.check_grads, guard.max_consecutive_skips, guard.stage) == (
        "stop",
        False,
        3,
        "cw_dpo",
    )
    with pytest.raises(
        ValueError, match=r"faults.policy must be one of \['skip', 'stop', 'off'\], got 'ignore'"
    ):
        reliability_callbacks("cw_dpo", OmegaConf.create({"faults": {"policy": "ignore"}}))
    from hydra import compose, initialize_config_dir

    from cwdpo.run.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train")
    assert cfg.faults.policy == "skip" and cfg.resume is None


def test_skip_count_survives_a_checkpoint():
    g = NonFiniteGuard()
    g.skipped, g.consecutive = 4, 1
    h = NonFiniteGuard()
    h.load_state_dict(g.state_dict())
    assert (h.skipped, h.consecutive) == (4, 1)
