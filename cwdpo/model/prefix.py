"""Prefix-shared chosen/rejected forward: image + instruction run once per pair.

A DPO pair shares its prefix x = (image, instruction); only the responses differ. The plain
path (`VLMBackbone.collate_pairs` + `logps`) runs the vision tower and every prompt token twice,
once for the chosen row and once for the rejected row. When image tokens dominate the sequence
that is most of the compute. Here each pair becomes ONE packed row

    [ prefix (left-padded to P) | chosen response (padded to Tc) | rejected response (Tr) ]

run in a single root `forward` (the vision tower sees each image once) with

* a block attention mask: prefix tokens follow the family's own rule (causal, plus the
  bidirectional spans of Gemma3's image tokens / PaliGemma's whole prefix, from the same
  token_type_ids the model would use), each response sees the whole prefix and itself
  (causally) only, never the other response; Gemma3's sliding-window layers get their own mask
  with the window measured in positions;
* continued positions: both responses start where the prefix ends. For Qwen's 3-D M-RoPE the
  positions are the model's own `get_rope_index` on the plain rows, gathered into the packed
  layout, so every token keeps exactly the position it has in the plain row.

Why a packed row and not the KV-cache expansion (prefix forward with `use_cache=True`, cache
gathered to 2n rows, continuation forward): transformers drops the cache inside checkpointed
layers (`GradientCheckpointingLayer`), and a cache mutated in forward is appended to again when
a checkpointed layer recomputes in backward, so it cannot be made checkpoint-safe without
replacing the layers' checkpointing. The packed row is one ordinary forward: gradient
checkpointing, LoRA, FSDP2 (root `forward` only) and the HF LM head's `logits_to_keep` work
unchanged, and there is no cache expansion at all. Gradients from both responses meet in the
prefix activations inside the one graph; log-probs and parameter gradients equal the plain
path's up to float rounding (tests/test_families.py, every family, with and without gradient
checkpointing, full fine-tuning and LoRA).

Supported where the model takes a custom 4-D mask: attention implementations `sdpa` and
`eager` (flash / flex attention fall back to the plain path), a model type in
`SHARED_PREFIX_MODEL_TYPES`, and sliding-window layers only where the model accepts a per-layer
mask mapping (Gemma3) or the rows fit in the window. `supports_prefix_sharing` says which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cwdpo.batch import IGNORE_INDEX, PER_TOKEN_KEYS, TEXT_KEYS
from cwdpo.losses.sequence import SeqLogps, token_logps

#: model_type values whose prefix-shared forward is tested equal to the plain forward
#: (tests/test_families.py, one row per family).
SHARED_PREFIX_MODEL_TYPES = frozenset(
    {
        "llava",
        "llava_next",
        "llava_onevision",
        "qwen2_vl",
        "qwen2_5_vl",
        "qwen3_vl",
        "idefics3",
        "smolvlm",
        "gemma3",
        "paligemma",
    }
)
#: Families whose root forward accepts {"full_attention", "sliding_attention"} mask mappings.
MASK_MAPPING_MODEL_TYPES = frozenset({"gemma3", "qwen2_vl", "qwen2_5_vl"})
#: Families whose token_type_ids make bidirectional blocks inside the prefix, and which rule:
#: Gemma3's contiguous image spans, PaliGemma's whole prefix (its prefix-LM).
BIDIRECTIONAL_BLOCKS = {"gemma3": "image_spans", "paligemma": "prefix"}
#: Attention implementations that take a custom 4-D mask (bool for sdpa, additive for eager).
_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
#: Packed per-image vision inputs (Qwen): patches [Σ t·h·w, D] split by image_grid_thw.
PACKED_VISION = {"pixel_values": "image_grid_thw"}


def _block_ids(model_type: str, token_type_ids: torch.Tensor) -> torch.Tensor:
    """The family's bidirectional blocks over plain rows, as the model's own
    `blockwise_overlay` reads them: tokens of one block id ≥ 0 attend both ways, -1 is causal."""
    if BIDIRECTIONAL_BLOCKS[model_type] == "prefix":  # the whole prefix (type 0) is one block
        return torch.where(token_type_ids == 0, 0, -1)
    is_img = token_type_ids == 1  # each contiguous image span is a block
    prev = nn.functional.pad(is_img, (1, 0), value=False)[:, :-1]
    gid = torch.cumsum((is_img & ~prev).int(), dim=1) - 1
    return torch.where(is_img, gid, -1)


@dataclass
class SharedPrefixBatch:
    """n packed rows [prefix | chosen | rejected] built from a `collate_pairs` batch."""

    inputs: dict[str, torch.Tensor]  # input_ids, position_ids, per-token keys, vision inputs
    allowed: torch.Tensor  # [n, L, L] bool block mask (full-attention layers)
    positions_1d: torch.Tensor  # [n, L] text positions (sliding-window distance)
    P: int  # prefix width: column P-1 predicts both responses' first token
    Tc: int
    Tr: int
    labels_c: torch.Tensor  # [n, Tc]
    labels_r: torch.Tensor  # [n, Tr]


def _model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _sliding_window(model: nn.Module) -> int | None:
    tc = _base(model).config.get_text_config()
    types = getattr(tc, "layer_types", None) or ()
    win = getattr(tc, "sliding_window", None)
    return win if win and "sliding_attention" in types else None


def supports_prefix_sharing(model: nn.Module, batch: dict | None = None) -> bool:
    """True where the packed shared-prefix forward is exact for `model` (and `batch`)."""
    base = _base(model)
    if _model_type(base) not in SHARED_PREFIX_MODEL_TYPES:
        return False
    if getattr(base.config, "_attn_implementation", "eager") not in _ATTN_IMPLEMENTATIONS:
        return False
    if batch is None:
        return True
    rows = batch["input_ids"].shape[0]
    for k, v in batch.items():  # batch-level inputs other than Qwen's image patches (videos)
        if k in TEXT_KEYS or k in PER_TOKEN_KEYS or k in PACKED_VISION or not torch.is_tensor(v):
            continue
        if k not in PACKED_VISION.values() and v.ndim and v.shape[0] != rows:
            return False
    win = _sliding_window(base)
    if win and _model_type(base) not in MASK_MAPPING_MODEL_TYPES:
        return int(batch["attention_mask"].sum(-1).max()) <= win  # one mask for all layers
    return True


def _plain_positions(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Positions of the plain right-padded rows: [2n, W] (1-D) or [3, 2n, W] (M-RoPE), from
    the model's own `get_rope_index` (parameter-free: no submodule forward is called)."""
    ids = batch["input_ids"]
    inner = getattr(_base(model), "model", None)
    if "mm_token_type_ids" in batch and hasattr(inner, "get_rope_index"):
        with torch.no_grad():
            pos, _ = inner.get_rope_index(
                ids,
                mm_token_type_ids=batch["mm_token_type_ids"],
                image_grid_thw=batch.get("image_grid_thw"),
                attention_mask=batch["attention_mask"],
            )
        return pos
    return torch.arange(ids.shape[1], device=ids.device).expand_as(ids)


def is_packed(batch: dict[str, torch.Tensor]) -> bool:
    """Vision inputs packed over the batch (Qwen patches + image_grid_thw), not one per row."""
    return any(g in batch for g in PACKED_VISION.values())


def images_per_row(batch: dict[str, torch.Tensor]) -> list[int]:
    """Images of each row of a batch with packed patches (Qwen): runs of image tokens in
    mm_token_type_ids (1 = image), in row order as the processor packs them."""
    tt = batch["mm_token_type_ids"] == 1
    starts = tt & ~nn.functional.pad(tt, (1, 0), value=False)[:, :-1]
    return starts.sum(-1).tolist()


def select_packed(batch: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    """The packed vision inputs (PACKED_VISION) of `rows` only, split per image by its grid."""
    per_row = images_per_row(batch)
    out = {}
    for key, grid_key in PACKED_VISION.items():
        if key not in batch or grid_key not in batch:
            continue
        grid = batch[grid_key]
        if sum(per_row) != grid.shape[0]:
            raise ValueError(f"{grid.shape[0]} images in {grid_key} but {sum(per_row)} in the rows")
        sizes = grid.prod(-1).tolist()
        img_start = [0]
        for c in per_row:
            img_start.append(img_start[-1] + c)
        patch_start = [0]
        for s in sizes:
            patch_start.append(patch_start[-1] + s)
        imgs = [j for r in rows for j in range(img_start[r], img_start[r + 1])]
        patches = [batch[key][patch_start[j] : patch_start[j + 1]] for j in imgs]
        out[key] = torch.cat(patches) if patches else batch[key][:0]
        out[grid_key] = grid[imgs]
    return out


def _check_pairs(batch: dict[str, torch.Tensor], n: int) -> tuple[torch.Tensor, list[str]]:
    """Prompt length of every row [2n] and the per-token keys present; ValueError unless rows i
    and n+i share their prompt tokens and per-token inputs over it."""
    ids, labels = batch["input_ids"], batch["labels"]
    rows, width = ids.shape
    if rows != 2 * n:
        raise ValueError(f"a pair batch has 2·n rows; got {rows} rows for n={n}")
    is_resp = labels != IGNORE_INDEX
    if not bool(is_resp.any(-1).all()):
        raise ValueError("every row of a pair batch needs at least one response token")
    plen = is_resp.float().argmax(-1)  # first response column = prompt length  [2n]
    if not torch.equal(plen[:n], plen[n:]):
        raise ValueError("chosen and rejected rows of a pair have prompts of different length")
    in_prompt = torch.arange(width, device=ids.device)[None, :] < plen[:n, None]
    per_tok = [k for k in PER_TOKEN_KEYS if k in batch]
    for k in ("input_ids", *per_tok):
        if not torch.equal(batch[k][:n] * in_prompt, batch[k][n:] * in_prompt):
            what = "prompt tokens" if k == "input_ids" else f"{k!r} over the prompt"
            raise ValueError(f"chosen and rejected rows of a pair do not share their {what}")
    return plen, per_tok


@dataclass
class _PackedLayout:
    """Where every column of the n packed rows comes from in the 2n plain rows."""

    src: torch.Tensor  # [n, L] source column in the plain row (clamped; see `ok`)
    ok: torch.Tensor  # [n, L] a real token (not padding)
    ridx: torch.Tensor  # [n, L] plain row: i (prefix, chosen) or n+i (rejected)
    seg: torch.Tensor  # [n, L] 0 prefix, 1 chosen, 2 rejected
    P: int
    Tc: int
    Tr: int

    def gather(self, t: torch.Tensor, fill: int = 0) -> torch.Tensor:
        return torch.where(self.ok, t[self.ridx, self.src], torch.full_like(self.src, fill))


def _packed_layout(plen: torch.Tensor, length: torch.Tensor, n: int, width: int) -> _PackedLayout:
    """[prefix right-aligned to column P | chosen response | rejected response] per pair, from
    prompt lengths and (right-padded) row lengths [2n]."""
    dev = plen.device
    pl = plen[:n]
    P = int(pl.max())
    rlen = length - plen
    Tc, Tr = int(rlen[:n].max()), int(rlen[n:].max())
    j = torch.arange(P, device=dev)[None, :]
    p_src = j - (P - pl[:, None])  # prefix right-aligned to column P
    tc = torch.arange(Tc, device=dev)[None, :]
    tr = torch.arange(Tr, device=dev)[None, :]
    c_src, c_ok = pl[:, None] + tc, tc < rlen[:n, None]
    r_src, r_ok = pl[:, None] + tr, tr < rlen[n:, None]
    src = torch.cat([p_src, c_src, r_src], 1).clamp(0, width - 1)  # [n, L]
    ok = torch.cat([p_src >= 0, c_ok, r_ok], 1)
    sizes = (P, Tc, Tr)
    seg = torch.cat([torch.full((n, w), s, device=dev) for s, w in enumerate(sizes)], 1)
    ridx = torch.arange(n, device=dev)[:, None] + n * (seg == 2).long()  # plain row per column
    return _PackedLayout(src, ok, ridx, seg, P, Tc, Tr)


def _block_mask(
    lay: _PackedLayout, batch: dict[str, torch.Tensor], model: nn.Module | None
) -> torch.Tensor:
    """[n, L, L] bool: same segment → causal (+ the family's bidirectional blocks); responses
    see the whole prefix; padding is never a key (a padding query sees itself: finite outputs)."""
    seg, ok = lay.seg, lay.ok
    L = seg.shape[1]
    q_seg, k_seg = seg[:, :, None], seg[:, None, :]
    ii = torch.arange(L, device=seg.device)
    causal = ii[None, :, None] >= ii[None, None, :]
    allowed = ((q_seg == k_seg) & causal) | ((k_seg == 0) & (q_seg > 0))
    mt = _model_type(_base(model)) if model is not None else None
    if "token_type_ids" in batch and mt in BIDIRECTIONAL_BLOCKS:
        blocks = _block_ids(mt, batch["token_type_ids"])
        if bool((blocks[batch["labels"] != IGNORE_INDEX] >= 0).any()):
            raise ValueError("a bidirectional block reaches into a response: no shared prefix")
        b = torch.where(ok & (seg == 0), blocks[lay.ridx, lay.src], -1)
        allowed |= (b[:, :, None] == b[:, None, :]) & (b[:, :, None] >= 0)
    allowed &= ok[:, None, :]
    allowed |= torch.eye(L, dtype=torch.bool, device=seg.device)[None] & ~ok[:, :, None]
    return allowed


def _pair_vision_inputs(
    batch: dict[str, torch.Tensor], n: int, per_tok: list[str]
) -> dict[str, torch.Tensor]:
    """Vision inputs of the n chosen rows; ValueError unless rows n+i hold the same.
    `collate_pairs` processes each pair's images once and copies them to row n+i, so on its
    batches this only compares memory; it guards batches built any other way."""
    rows = batch["input_ids"].shape[0]
    packed = is_packed(batch)
    inputs: dict[str, torch.Tensor] = {}
    for k, v in batch.items():
        if k in TEXT_KEYS or k in per_tok or not torch.is_tensor(v):
            continue
        if v.ndim == 0:
            inputs[k] = v
            continue
        if packed and (k in PACKED_VISION or k in PACKED_VISION.values()):
            continue
        if v.shape[0] != rows:
            raise ValueError(
                f"batch[{k!r}] has {v.shape[0]} rows, not one per sequence ({rows}): this "
                "model's vision inputs cannot be split per pair; use the plain forward"
            )
        if not torch.equal(v[:n], v[n:]):
            raise ValueError(f"chosen and rejected rows of a pair have different {k!r}")
        inputs[k] = v[:n]
    if packed:
        first = select_packed(batch, list(range(n)))
        second = select_packed(batch, list(range(n, 2 * n)))
        for k, v in first.items():
            if not torch.equal(v, second[k]):
                raise ValueError(f"chosen and rejected rows of a pair have different {k!r}")
        inputs.update(first)
    return inputs


def split_pairs(
    batch: dict[str, torch.Tensor], n: int, model: nn.Module | None = None
) -> SharedPrefixBatch:
    """Pack a `collate_pairs` batch (rows i and n+i share image and prompt) into n rows.
    Raises ValueError if a pair's rows do not share their prompt and vision inputs."""
    ids, labels = batch["input_ids"], batch["labels"]
    plen, per_tok = _check_pairs(batch, n)
    lay = _packed_layout(plen, batch["attention_mask"].sum(-1), n, ids.shape[1])
    src, ok, ridx = lay.src, lay.ok, lay.ridx
    inputs: dict[str, torch.Tensor] = {"input_ids": lay.gather(ids)}
    for k in per_tok:
        inputs[k] = lay.gather(batch[k])
    if model is not None:
        pos = _plain_positions(model, batch)
    else:
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    if pos.ndim == 3:  # M-RoPE [3, 2n, W]
        inputs["position_ids"] = torch.where(ok, pos[:, ridx, src], 0)
        pos1 = torch.where(ok, pos[0][ridx, src], 0)
    else:
        inputs["position_ids"] = pos1 = torch.where(ok, pos[ridx, src], 0)
    allowed = _block_mask(lay, batch, model)
    inputs.update(_pair_vision_inputs(batch, n, per_tok))
    lab = lay.gather(labels, IGNORE_INDEX)
    P, Tc, Tr = lay.P, lay.Tc, lay.Tr
    return SharedPrefixBatch(inputs, allowed, pos1, P, Tc, Tr, lab[:, P : P + Tc], lab[:, P + Tc :])


def _mask_argument(model: nn.Module, sp: SharedPrefixBatch, dtype: torch.dtype):
    """The block mask in the form the model's attention takes (4-D bool for sdpa, additive for
    eager; a per-layer-type mapping where sliding-window layers need their own)."""
    base = _base(model)

    def fmt(m: torch.Tensor) -> torch.Tensor:
        m = m[:, None]
        if base.config._attn_implementation == "eager":
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(
                ~m, torch.finfo(dtype).min
            )
        return m

    full = fmt(sp.allowed)
    win = _sliding_window(base)
    if win and _model_type(base) in MASK_MAPPING_MODEL_TYPES:
        p = sp.positions_1d
        near = p[:, None, :] > p[:, :, None] - win
        sliding = sp.allowed & (near | torch.eye(p.shape[1], dtype=torch.bool, device=p.device))
        return {"full_attention": full, "sliding_attention": fmt(sliding)}
    return full


def shared_prefix_logps(model: nn.Module, batch: dict[str, torch.Tensor], n: int) -> SeqLogps:
    """Per-sequence response log-probs of a `collate_pairs` batch via the packed shared prefix
    (chosen rows then rejected rows, as `VLMBackbone.logps` returns them)."""
    sp = split_pairs(batch, n, model)
    dtype = next(model.parameters()).dtype
    L = sp.allowed.shape[-1]
    out = model(
        **sp.inputs,
        attention_mask=_mask_argument(model, sp, dtype),
        use_cache=False,
        logits_to_keep=L - (sp.P - 1),  # column P-1 predicts the first response token
    )
    lg = out.logits  # [n, 1 + Tc + Tr, V]: columns P-1 … L-1
    chosen = lg[:, : sp.Tc]
    rejected = torch.cat([lg[:, :1], lg[:, 1 + sp.Tc : sp.Tc + sp.Tr]], dim=1)
    (tc, mc), (tr, mr) = token_logps(chosen, sp.labels_c), token_logps(rejected, sp.labels_r)
    T = max(sp.Tc, sp.Tr)

    def cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([nn.functional.pad(t, (0, T - t.shape[1])) for t in (a, b)])

    # sums from the per-token rows, as `sequence_logps`: the loss reaches the parameters
    # through `token` (the dynamics callback's chosen/rejected gradient split needs that)
    token, mask = cat(tc, tr), cat(mc, mr)
    count = mask.sum(-1)
    total = token.sum(-1)
    return SeqLogps(sum=total, mean=total / count.clamp(min=1), count=count, token=token, mask=mask)
