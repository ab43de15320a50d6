"""Canonical hashes of protocol values: tensors (dtype, shape, bytes), ints, strings and bytes."""

from __future__ import annotations

import hashlib
import struct
from typing import Union

import torch

__all__ = ["digest"]

Hashable = Union[bytes, str, int, float, torch.Tensor]


def _encode(item: Hashable) -> bytes:
    if isinstance(item, torch.Tensor):
        t = item.detach().contiguous().cpu()
        head = f"T{t.dtype}:{tuple(t.shape)}:".encode()
        return head + t.view(torch.uint8).numpy().tobytes() if t.numel() else head
    if isinstance(item, bytes):
        return b"B" + item
    if isinstance(item, str):
        return b"S" + item.encode()
    if isinstance(item, bool):
        raise TypeError("digest does not take bools (ambiguous with ints)")
    if isinstance(item, int):
        return b"I" + str(item).encode()
    if isinstance(item, float):
        return b"F" + struct.pack("<d", item)
    raise TypeError(f"cannot digest {type(item).__name__}")


def digest(*items: Hashable) -> bytes:
    """A 32-byte BLAKE2b digest of the items, each length-prefixed (no two sequences share an encoding)."""
    h = hashlib.blake2b(digest_size=32)
    for item in items:
        enc = _encode(item)
        h.update(len(enc).to_bytes(8, "little"))
        h.update(enc)
    return h.digest()
