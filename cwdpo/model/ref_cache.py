"""Reference log-prob cache for dataset preference pairs.

π_ref is frozen during CW-DPO, so log π_ref(y|x) of a dataset pair never changes: compute it
once, reuse it every epoch (TRL's `precompute_ref_log_probs`, which TRL refuses for image data).
On-policy negatives are new at every refresh, so their reference log-probs are computed in the
same pass and never stored.

Keys. A pair's key is sha256 over (a fingerprint of the reference weights, the exact model
inputs of the pair: token ids of the chosen and rejected rows, where their responses start, and
the pair's pixel tensors). Keying on the collated inputs rather than on raw texts/image files
makes the key cover everything that changes the value — chat template, tokenizer, truncation
(max_length), image preprocessing — and a new snapshot of π_ref (new fingerprint) invalidates
every entry. Values are the float32 sequence sums (chosen, rejected), stored exactly.

Storage: `<root>/<fingerprint[:16]>/rank<r>.safetensors` with two tensors, `keys` (uint8
[N, 32] digests) and `values` (float32 [N, 2]); written atomically (temp file + rename). Each
DDP rank writes its own shard; loading merges every shard under the fingerprint's folder.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cwdpo.batch import IGNORE_INDEX, PER_TOKEN_KEYS, TEXT_KEYS
from cwdpo.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous().reshape(-1)  # 0-d too (OneVision's batch_num_images)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def module_fingerprint(module: nn.Module, skip: tuple[str, ...] = ()) -> str:
    """sha256 of a module's state_dict (names, dtypes, shapes and bytes), skipping names that
    contain any of `skip` (e.g. "lora_" for the adapters-disabled reference)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if any(s in name for s in skip) or not torch.is_tensor(t):
            continue
        h.update(name.encode())
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _reference_weights(backbone: Any) -> tuple[nn.Module, tuple[str, ...]]:
    """(module, names to skip) holding π_ref: the frozen copy, or with LoRA the base weights
    (the adapters are off for the reference)."""
    if not getattr(backbone, "has_reference", False):
        raise RuntimeError("no reference policy to identify: call snapshot_reference() first")
    ref = getattr(backbone, "reference", None)
    return (ref, ()) if ref is not None else (backbone.model, ("lora_",))


def reference_fingerprint(backbone: Any) -> str:
    """Exact fingerprint of π_ref (every byte): the key of reference-cache entries."""
    module, skip = _reference_weights(backbone)
    return module_fingerprint(module, skip=skip)


def reference_signature(backbone: Any, samples: int = 256) -> str:
    """A cheap identity check of π_ref for checkpoints: tensor names, shapes and `samples`
    evenly spaced values per tensor, as bfloat16 (so fp32 vs bf16 storage does not matter).
    Milliseconds even for a 70B model, but it can miss a change between the sampled values:
    cache keys use the exact `reference_fingerprint`."""
    module, skip = _reference_weights(backbone)
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if any(s in name for s in skip) or not torch.is_tensor(t):
            continue
        flat = t.detach().reshape(-1)
        idx = torch.linspace(0, max(flat.numel() - 1, 0), min(samples, flat.numel())).long()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(flat[idx.to(flat.device)].to(torch.bfloat16)))
    return h.hexdigest()


def pair_keys(batch: dict[str, torch.Tensor], n: int, fingerprint: str) -> list[bytes]:
    """One 32-byte key per pair of a `collate_pairs` batch (rows i and n+i): token ids and
    per-token inputs of both rows, where their responses start, and the pair's own vision
    inputs (packed Qwen patches split per pair by image_grid_thw)."""
    from cwdpo.model.prefix import is_packed, select_packed

    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows = ids.shape[0]
    per_tok = [k for k in PER_TOKEN_KEYS if k in batch]
    vision = {
        k: v
        for k, v in batch.items()
        if k not in TEXT_KEYS and k not in per_tok and torch.is_tensor(v)
    }
    packed = is_packed(batch)
    keys = []
    for i in range(n):
        h = hashlib.sha256(fingerprint.encode())
        for r in (i, n + i):
            m = mask[r].bool()
            h.update(b"|row|")
            h.update(_tensor_bytes(ids[r][m].to(torch.int64)))
            h.update(_tensor_bytes((labels[r][m] != IGNORE_INDEX).to(torch.uint8)))
            for k in per_tok:
                h.update(k.encode())
                h.update(_tensor_bytes(batch[k][r][m].to(torch.int64)))
        own = select_packed(batch, [i]) if packed else {}
        for k in sorted(vision):
            v = own.get(k, vision[k])
            h.update(k.encode())
            if k in own or not v.ndim:
                h.update(_tensor_bytes(v))
            elif v.shape[0] == rows:
                h.update(_tensor_bytes(v[i]))
            else:  # an unknown batch-level input: the whole tensor (a miss, never a wrong hit)
                h.update(_tensor_bytes(v))
        keys.append(h.digest())
    return keys


def select_pairs(
    batch: dict[str, torch.Tensor], n: int, idx: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Sub-batch of pairs `idx` (chosen rows then rejected rows), right padding trimmed;
    packed patches (Qwen) are split per image by image_grid_thw."""
    from cwdpo.model.prefix import is_packed, select_packed

    rows = batch["input_ids"].shape[0]
    sel = torch.cat([idx, idx + n]).to(batch["input_ids"].device)
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.ndim and v.shape[0] == rows:
            out[k] = v[sel.to(v.device)]
        else:
            out[k] = v
    if is_packed(batch):
        out.update(select_packed(batch, sel.tolist()))
    width = int(out["attention_mask"].sum(-1).max())
    for k in (*TEXT_KEYS, *(k for k in PER_TOKEN_KEYS if k in out)):
        out[k] = out[k][:, :width]
    return out


def open_ref_cache(ref_cache: str | Path | RefLogpCache | None) -> RefLogpCache | None:
    """`stage.cw_dpo.module.ref_cache` as configured: a directory (a new cache there), a RefLogpCache
    (used as it is), or None (no cache: reference log-probs are computed every step)."""
    return RefLogpCache(ref_cache) if isinstance(ref_cache, str | Path) else ref_cache


class RefLogpCache:
    """Reference log-prob sums of dataset pairs, keyed by `pair_keys`, persisted per rank."""

    def __init__(self, root: str | Path, rank: int = 0) -> None:
        self.root = Path(root)
        self.rank = rank
        self.fingerprint: str | None = None
        self.table: dict[bytes, tuple[float, float]] = {}
        self.hits = self.misses = 0
        self._dirty = False

    @property
    def folder(self) -> Path:
        if self.fingerprint is None:
            raise RuntimeError("RefLogpCache is not bound to a reference: call bind() first")
        return self.root / self.fingerprint[:16]

    def bind(self, fingerprint: str) -> RefLogpCache:
        """Use the entries of reference `fingerprint` (loading every rank's shard on disk)."""
        from safetensors.torch import load_file

        if fingerprint == self.fingerprint:
            return self
        self.fingerprint, self.table, self._dirty = fingerprint, {}, False
        for f in sorted(self.folder.glob("rank*.safetensors")):
            try:
                d = load_file(str(f))
                keys, values = d["keys"], d["values"].tolist()
            except Exception as e:  # a corrupt shard costs a recomputation, never a wrong value
                log.warning("ignoring unreadable reference-logp cache %s: %s", f, e)
                continue
            for k, v in zip(keys.numpy(), values):
                self.table[k.tobytes()] = (v[0], v[1])
        return self

    def bind_reference(self, backbone: Any, rank: int = 0) -> RefLogpCache:
        """At fit start: this rank's shard, holding the entries of the backbone's π_ref as it is
        now (`reference_fingerprint`; a new snapshot starts an empty table)."""
        self.rank = rank
        return self.bind(reference_fingerprint(backbone))

    def __len__(self) -> int:
        return len(self.table)

    def lookup(self, keys: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hit [n] bool, values [n, 2] float32: chosen, rejected; 0 where missing)."""
        hit = torch.tensor([k in self.table for k in keys], dtype=torch.bool)
        vals = torch.tensor([self.table.get(k, (0.0, 0.0)) for k in keys], dtype=torch.float32)
        return hit, vals.reshape(len(keys), 2)

    def add(self, keys: list[bytes], chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        c = chosen.detach().float().cpu().tolist()
        r = rejected.detach().float().cpu().tolist()
        for k, a, b in zip(keys, c, r):
            self.table[k] = (a, b)
        self._dirty = self._dirty or bool(keys)

    def flush(self) -> Path | None:
        """Write this rank's shard atomically (no-op when nothing changed)."""
        from safetensors.torch import save

        if not self._dirty or self.fingerprint is None:
            return None
        keys = list(self.table)
        kt = torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).reshape(len(keys), 32)
        vt = torch.tensor([self.table[k] for k in keys], dtype=torch.float32).reshape(len(keys), 2)
        path = self.folder / f"rank{self.rank}.safetensors"
        atomic_write_bytes(path, save({"keys": kt, "values": vt}))
        self._dirty = False
        return path


def cached_reference_logps(
    backbone: Any,
    cache: RefLogpCache,
    batch: dict[str, torch.Tensor],
    n: int,
    cacheable: torch.Tensor | None = None,
    prefix_sharing: bool = False,
) -> torch.Tensor:
    """Reference sums [2n] (chosen rows, rejected rows): cached where known, the rest computed
    in one reference forward over the missing pairs only. Pairs with `cacheable` False
    (on-policy negatives) are always computed and never stored."""
    keys = pair_keys(batch, n, cache.fingerprint or "")
    hit, vals = cache.lookup(keys)
    if cacheable is not None:
        hit &= cacheable.to(torch.bool).cpu()
    cache.hits += int(hit.sum())
    cache.misses += int((~hit).sum())
    dev = batch["input_ids"].device
    ref = torch.cat([vals[:, 0], vals[:, 1]]).to(dev)
    miss = (~hit).nonzero().flatten()
    if len(miss):
        sub = select_pairs(batch, n, miss) if len(miss) < n else batch
        out = backbone.pair_logps(sub, len(miss), reference=True, prefix_sharing=prefix_sharing)
        m = len(miss)
        ref = ref.clone()
        ref[miss.to(dev)] = out.sum[:m].to(ref.dtype)
        ref[(miss + n).to(dev)] = out.sum[m:].to(ref.dtype)
        store = miss if cacheable is None else miss[cacheable.to(torch.bool).cpu()[miss]]
        if len(store):
            pos = {int(j): t for t, j in enumerate(miss.tolist())}
            rows = torch.tensor([pos[int(j)] for j in store])
            cache.add([keys[int(j)] for j in store], out.sum[:m][rows], out.sum[m:][rows])
    return ref
