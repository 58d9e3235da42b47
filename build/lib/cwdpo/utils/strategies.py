"""Fully sharded training with FSDP2 (`torch.distributed.fsdp.fully_shard`), on GPUs or CPUs.

`trainer=fsdp` uses Lightning's `FSDPStrategy`, i.e. FSDP1, which torch refuses on CPU ("FSDP
needs a non-CPU accelerator device"). FSDP2 runs on CPU tensors over gloo as well as on GPUs,
so `trainer=fsdp2` (GPUs) and `trainer=fsdp_cpu` (tests, debugging) use Lightning's
`ModelParallelStrategy`, which hands the LightningModule a device mesh in `configure_model`;
`StageModule.configure_model` calls `shard_backbone` there. Each transformer block of the
policy (and of the frozen reference copy, with full fine-tuning) becomes one FSDP2 unit, the
model root another: parameters, gradients and optimizer state are sharded over the
data-parallel ranks; LoRA's reference is the same sharded base with the adapters disabled.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` as pure FSDP2: every rank one data-parallel shard
    (`tensor_parallel_size=1`), full single-file checkpoints by default.
    """

    def __init__(
        self,
        data_parallel_size: int | str = "auto",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # one data-parallel group over every process
            self._data_parallel_size = self.num_processes * self.num_nodes
        super().setup_environment()


def block_classes(model: nn.Module) -> set[str]:
    """Class names of the repeated blocks (HF's `_no_split_modules`: decoder and vision layers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    names = set(getattr(base, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(
            f"{type(base).__name__} declares no `_no_split_modules`, so there is no block to make "
            "an FSDP2 unit of; use trainer=ddp (or LoRA) for this model"
        )
    return names


def in_vision_tower(name: str) -> bool:
    """Whether a qualified module name lies in the vision encoder (`vision_tower`, `visual`…)."""
    return any(part.startswith(("vision", "visual")) for part in name.split("."))


def shard_model(model: nn.Module, mesh: Any) -> int:
    """fully_shard every language block, then the root; returns the number of units.

    The vision encoder stays in the root unit, which every rank gathers at every forward: were
    its blocks units of their own, a rank whose batch holds no image (text-only rows) would
    skip their all-gathers while the others wait in them — the hang ZeRO-3 / FSDP users meet
    with mixed image/text data. The vision tower is small next to the language model.
    """
    from torch.distributed.fsdp import fully_shard

    names = block_classes(model)
    blocks = {
        n: m
        for n, m in model.named_modules()
        if type(m).__name__ in names and not in_vision_tower(n)
    }
    for m in blocks.values():
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    keep_root_in_step(model, tuple(f"{n}." for n in blocks))
    return len(blocks) + 1


def keep_root_in_step(model: nn.Module, block_prefixes: tuple[str, ...]) -> None:
    """Give every trainable parameter of the root unit a gradient at every forward.

    FSDP2 reduce-scatters the gradients its root unit holds; on a rank whose batch has no image
    the vision tower and projector get none, the collectives' sizes differ across ranks and the
    step breaks or hangs. A zero-weighted touch of each root parameter (the parameter-level
    "dummy vision pass") adds exact zeros to the gradients and keeps the ranks in step; it also
    gives parameters no batch uses (CLIP's post_layernorm) an optimizer state on every rank. It
    runs inside the root forward, where FSDP2 has the parameters unsharded (the hook is
    prepended before FSDP2's own post-forward hook).
    """

    def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        logits = getattr(output, "logits", None)
        if logits is None or not torch.is_grad_enabled():
            return output
        root = [
            p
            for n, p in module.named_parameters()
            if p.requires_grad and not n.startswith(block_prefixes)
        ]
        if root:
            output.logits = logits + 0.0 * sum(p.reshape(-1)[:1].sum() for p in root)
        return output

    model.register_forward_hook(hook, prepend=True, with_kwargs=True)


def shard_backbone(backbone: Any, mesh: Any) -> int:
    """Shard the policy and (full fine-tuning) the frozen reference copy over `mesh`."""
    units = shard_model(backbone.model, mesh)
    if getattr(backbone, "reference", None) is not None:
        units += shard_model(backbone.reference, mesh)
    return units


def data_parallel_mesh(mesh: Any) -> Any:
    """The data-parallel dimension of Lightning's (data_parallel, tensor_parallel) mesh."""
    names = getattr(mesh, "mesh_dim_names", None) or ()
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of an FSDP2 model on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def unshard_backbone(sharded: Any, build: Any) -> Any:
    """A plain backbone with the trained weights of an FSDP2-sharded one, on every rank.

    After `fit` the pipeline saves, evaluates and starts the next stage from the policy, which
    needs ordinary tensors: `build()` makes a fresh backbone of the same configuration and the
    gathered weights are loaded into it (policy, and the reference copy with full fine-tuning;
    with LoRA the reference is the base under disabled adapters, as in the sharded one).
    """
    fresh = build()
    fresh.model.load_state_dict(full_state(sharded.model))
    if sharded.reference is not None:
        fresh.snapshot_reference()
        fresh.reference.load_state_dict(full_state(sharded.reference))
    fresh.has_reference = sharded.has_reference
    return fresh
