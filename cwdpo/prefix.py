"""Prefix-shared chosen/rejected forward: image + instruction run once per pair.

A DPO pair shares its prefix x = (image, instruction); only the responses differ. The plain
path (`VLMBackbone.collate_pairs` + `logps`) runs the vision tower and every prompt token twice,
once for the chosen row and once for the rejected row. When image tokens dominate the sequence
(captioning: 64 image tokens + ~8 prompt tokens + ~15 caption tokens in the tiny LLaVA) that is
most of the compute. Here the model runs once on the n prefixes with `use_cache=True`; the KV
cache is expanded to the 2n rows (chosen rows then rejected rows, the `collate_pairs` order) and
the language model runs on the continuations only. Gradients flow through the expanded cache
back into the prefix (prompt KV, projector, vision tower) from both continuations, so log-probs
and parameter gradients equal the plain path's up to float rounding (tested).

The layout is rebuilt from an ordinary `collate_pairs` batch (no special collation): prefixes
are left-aligned with padding so that every row's prompt ends in the same column, and explicit
position ids keep each token at the position it has in the plain, right-padded row; prompts
of unequal length are therefore handled exactly.

Supported: decoder-only VLMs with 1-D positions whose image features depend only on the image
(LLaVA). Other model types (Qwen2-VL's 3-D M-RoPE, PaliGemma's prefix-LM attention) and
gradient checkpointing in training mode (transformers drops the cache there) fall back to the
plain path: `supports_prefix_sharing` says which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cwdpo.objectives import IGNORE_INDEX, TEXT_KEYS, SeqLogps, sequence_logps

#: model_type values whose prefix-shared forward is tested equal to the plain forward.
SHARED_PREFIX_MODEL_TYPES = frozenset({"llava"})


@dataclass
class SharedPrefixBatch:
    """A `collate_pairs` batch split into n shared prefixes and 2n continuations."""

    prefix_ids: torch.Tensor  # [n, P] left-padded prompt (image tokens included)
    prefix_mask: torch.Tensor  # [n, P]
    prefix_pos: torch.Tensor  # [n, P] position of each token in its plain row
    vision: dict[str, torch.Tensor]  # pixel_values & co. for the n prefixes only
    cont_ids: torch.Tensor  # [2n, T] right-padded responses
    cont_mask: torch.Tensor  # [2n, T]
    cont_pos: torch.Tensor  # [2n, T]
    labels: torch.Tensor  # [2n, T] response ids, IGNORE_INDEX on padding


def _model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def _checkpointing_active(model: nn.Module) -> bool:
    return any(
        getattr(m, "gradient_checkpointing", False) and m.training for m in model.modules()
    )


def supports_prefix_sharing(model: nn.Module) -> bool:
    """True where the shared-prefix forward is exact for `model` in its current mode."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _model_type(base) in SHARED_PREFIX_MODEL_TYPES and not _checkpointing_active(model)


def split_pairs(batch: dict[str, torch.Tensor], n: int) -> SharedPrefixBatch:
    """Split a `collate_pairs` batch (rows i and n+i share image and prompt) into prefix and
    continuations. Raises ValueError if a pair's rows do not share their prompt tokens."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows, width = ids.shape
    if rows != 2 * n:
        raise ValueError(f"a pair batch has 2·n rows; got {rows} rows for n={n}")
    dev = ids.device
    is_resp = labels != IGNORE_INDEX
    if not bool(is_resp.any(-1).all()):
        raise ValueError("every row of a pair batch needs at least one response token")
    plen = is_resp.float().argmax(-1)  # first response column = prompt length  [2n]
    length = mask.sum(-1)  # right-padded rows: real tokens are [0, length)
    if not torch.equal(plen[:n], plen[n:]):
        raise ValueError("chosen and rejected rows of a pair have prompts of different length")
    cols = torch.arange(width, device=dev)
    in_prompt = cols[None, :] < plen[:n, None]
    if not torch.equal(ids[:n] * in_prompt, ids[n:] * in_prompt):
        raise ValueError("chosen and rejected rows of a pair do not share their prompt tokens")

    # prefix: row i's prompt right-aligned to column P (left padding)
    pl = plen[:n]
    P = int(pl.max())
    j = torch.arange(P, device=dev)[None, :]
    src = j - (P - pl[:, None])  # source column in the plain row
    valid = src >= 0
    src_c = src.clamp(min=0)
    pad = ids.new_full((), 0)
    prefix_ids = torch.where(valid, ids[:n].gather(1, src_c), pad)
    prefix_mask = valid.to(mask.dtype)
    prefix_pos = src_c

    # continuations: response tokens from column plen on, right-padded to T
    rlen = length - plen
    T = int(rlen.max())
    t = torch.arange(T, device=dev)[None, :]
    csrc = (plen[:, None] + t).clamp(max=width - 1)
    cvalid = t < rlen[:, None]
    cont_ids = torch.where(cvalid, ids.gather(1, csrc), pad)
    cont_mask = cvalid.to(mask.dtype)
    cont_pos = plen[:, None] + t
    cont_labels = torch.where(cvalid, labels.gather(1, csrc), torch.full_like(cont_ids, IGNORE_INDEX))

    vision = {}
    for k, v in batch.items():
        if k in TEXT_KEYS or not torch.is_tensor(v):
            continue
        if v.shape[0] != rows:
            raise ValueError(
                f"batch[{k!r}] has {v.shape[0]} rows, not one per sequence ({rows}): this "
                "model's vision inputs cannot be split per pair; use the plain forward"
            )
        if not torch.equal(v[:n], v[n:]):
            raise ValueError(f"chosen and rejected rows of a pair have different {k!r}")
        vision[k] = v[:n]
    return SharedPrefixBatch(
        prefix_ids, prefix_mask, prefix_pos, vision, cont_ids, cont_mask, cont_pos, cont_labels
    )


def shared_prefix_logits(
    model: nn.Module, sp: SharedPrefixBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [2n, T, V], labels [2n, T]) aligned: logits[:, t] predicts labels[:, t]."""
    n = sp.prefix_ids.shape[0]
    out = model(
        input_ids=sp.prefix_ids,
        attention_mask=sp.prefix_mask,
        position_ids=sp.prefix_pos,
        **sp.vision,
        use_cache=True,
        logits_to_keep=1,  # the last prompt position predicts the first response token
    )
    cache = out.past_key_values
    if cache is None:
        raise RuntimeError("the model returned no KV cache for the prefix (use_cache ignored)")
    idx = torch.arange(n, device=sp.prefix_ids.device).repeat(2)  # chosen rows, rejected rows
    cache.batch_select_indices(idx)  # a gather: its backward sums both continuations' grads
    first = out.logits[:, -1:][idx]
    out2 = model(
        input_ids=sp.cont_ids,
        attention_mask=torch.cat([sp.prefix_mask[idx], sp.cont_mask], dim=1),
        position_ids=sp.cont_pos,
        past_key_values=cache,
        use_cache=True,
    )
    logits = torch.cat([first, out2.logits[:, :-1]], dim=1)
    return logits, sp.labels


def shared_prefix_logps(
    model: nn.Module, batch: dict[str, torch.Tensor], n: int
) -> SeqLogps:
    """Per-sequence response log-probs of a `collate_pairs` batch via the shared prefix."""
    logits, labels = shared_prefix_logits(model, split_pairs(batch, n))
    return sequence_logps(logits, labels)
