"""Strings as flat ``uint8`` tensors, so torchmetrics can all-gather text across DDP ranks.

Why: corpus-level scores (CIDEr's IDF, BLEU's brevity penalty, multiple-choice answers) need
every rank's strings; a list state of these tensors with ``dist_reduce_fx="cat"`` gathers them,
because the encoding is closed under concatenation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def encode_strings(strings: Sequence[str], device: torch.device | str | None = None) -> Tensor:
    """Encode strings as a flat ``uint8`` tensor: per string a 4-byte little-endian length + UTF-8.

    The format is closed under concatenation (``cat(enc(a), enc(b)) == enc(a + b)``), which is
    what lets ``dist_reduce_fx="cat"`` gather strings from all ranks.
    """
    buf = bytearray()
    for s in strings:
        data = s.encode("utf-8")
        buf += _u32(len(data)) + data
    return (
        torch.frombuffer(buf, dtype=torch.uint8).clone().to(device)
        if buf
        else torch.zeros(0, dtype=torch.uint8, device=device)
    )


def encode_nested(
    groups: Sequence[Sequence[str]], device: torch.device | str | None = None
) -> Tensor:
    """Encode a list of string lists: per item a 4-byte count, then its strings as above."""
    parts = []
    for items in groups:
        parts.append(torch.tensor(list(_u32(len(items))), dtype=torch.uint8, device=device))
        parts.append(encode_strings(items, device=device))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8, device=device)


def _as_bytes(data: Tensor | bytes) -> bytes:
    if isinstance(data, Tensor):
        return data.detach().to("cpu", torch.uint8).numpy().tobytes()
    return data


def _read_strings(buf: bytes, pos: int, count: int | None) -> tuple[list[str], int]:
    out: list[str] = []
    while pos < len(buf) and (count is None or len(out) < count):
        n = int.from_bytes(buf[pos : pos + 4], "little")
        out.append(buf[pos + 4 : pos + 4 + n].decode("utf-8"))
        pos += 4 + n
    return out, pos


def decode_strings(data: Tensor | bytes) -> list[str]:
    """Inverse of :func:`encode_strings`."""
    return _read_strings(_as_bytes(data), 0, None)[0]


def decode_nested(data: Tensor | bytes) -> list[list[str]]:
    """Inverse of :func:`encode_nested`."""
    buf, pos, out = _as_bytes(data), 0, []
    while pos < len(buf):
        count = int.from_bytes(buf[pos : pos + 4], "little")
        items, pos = _read_strings(buf, pos + 4, count)
        out.append(items)
    return out
