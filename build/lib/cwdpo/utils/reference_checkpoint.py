"""π_ref in the Lightning checkpoints of the CW-DPO stage.

π_ref is not training state: before fit it is re-created from the stage's starting policy (the
pipeline snapshots it from the saved stage-1 output, also on resume). Checkpoints record its
signature (`cwdpo.model.ref_cache.reference_signature`), and under single-device / DDP leave
the frozen copy out (full fine-tuning: about half the weights on disk); loading refuses a
checkpoint trained against another reference and puts the live copy back, so strict loading
still checks the policy. FSDP and DeepSpeed save and load weights themselves: the copy stays
in their checkpoints.

`ReferenceCheckpoint` does the surgery; `CWDPOModule`'s checkpoint hooks call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn

#: state_dict prefix of the frozen reference copy inside a stage module
REFERENCE_PREFIX = "backbone.reference."
#: checkpoint key of the reference signature
SIGNATURE_KEY = "cwdpo_reference_signature"


def drops_reference(trainer: Any) -> bool:
    """Whether checkpoints of this fit leave the frozen reference out: under single-device and
    DDP (and outside a fit, `trainer` None, e.g. a hand-made checkpoint), not under strategies
    that save and load the weights themselves (FSDP, DeepSpeed)."""
    return trainer is None or type(trainer.strategy) in (SingleDeviceStrategy, DDPStrategy)


@dataclass
class ReferenceCheckpoint:
    """The reference's signature (set before the strategy moves, casts or shards anything and
    before a checkpoint is restored; None without a reference) and the checkpoint surgery."""

    signature: str | None = None
    prefix: str = REFERENCE_PREFIX

    def save(self, checkpoint: dict[str, Any], drop: bool) -> None:
        """Record the signature; with `drop`, take the reference tensors out of the state."""
        if self.signature is not None:
            checkpoint[SIGNATURE_KEY] = self.signature
        state = checkpoint.get("state_dict")
        if state is not None and drop:
            for key in [k for k in state if k.startswith(self.prefix)]:
                del state[key]

    def load(self, checkpoint: dict[str, Any], reference: nn.Module | None) -> None:
        """Refuse a checkpoint of another reference; put the live `reference` (the frozen copy,
        None with LoRA) back into a state that left it out."""
        saved, live = checkpoint.get(SIGNATURE_KEY), self.signature
        if saved is not None and live is not None and saved != live:
            raise RuntimeError(
                "this CW-DPO checkpoint was trained against a different reference policy than the "
                "one loaded now (signatures differ): resume from the run directory whose stage-1 "
                "output it started from (`resume=<run dir>`), or start the stage fresh"
            )
        state = checkpoint.get("state_dict")
        if (
            state is not None
            and reference is not None
            and not any(k.startswith(self.prefix) for k in state)
        ):
            state.update({self.prefix + k: v for k, v in reference.state_dict().items()})
