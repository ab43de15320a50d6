"""Canonical hashes of protocol values: tensors (dtype, shape, bytes), ints, strings and bytes.

BLAKE3 (the ``blake3`` package): a cryptographic hash about five times faster than BLAKE2b here (8 ms
for a 44 MB gradient on one core), which matters because every round hashes every gradient part and
aggregate. Tensors are hashed from their memory, without a copy.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Union

import torch
from blake3 import blake3

__all__ = ["digest", "tensors_digest"]

Hashable = Union[bytes, str, int, float, torch.Tensor]


def _encode(item: Hashable) -> tuple[bytes, object]:
    """A type-and-shape header and the payload (bytes, or a tensor's memory as a buffer)."""
    if isinstance(item, torch.Tensor):
        t = item.detach().contiguous().cpu()
        head = f"T{t.dtype}:{tuple(t.shape)}:".encode()
        return head, (t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    if isinstance(item, bytes):
        return b"B", item
    if isinstance(item, str):
        return b"S", item.encode()
    if isinstance(item, bool):
        raise TypeError("digest does not take bools (ambiguous with ints)")
    if isinstance(item, int):
        return b"I", str(item).encode()
    if isinstance(item, float):
        return b"F", struct.pack("<d", item)
    raise TypeError(f"cannot digest {type(item).__name__}")


def digest(*items: Hashable) -> bytes:
    """A 32-byte BLAKE3 digest of the items, each length-prefixed (no two sequences share an encoding)."""
    h = blake3()
    for item in items:
        head, payload = _encode(item)
        h.update((len(head) + len(memoryview(payload).cast("B"))).to_bytes(8, "little"))  # type: ignore[arg-type]
        h.update(head)
        h.update(payload)  # type: ignore[arg-type]
    return h.digest()


def tensors_digest(tensors: Iterable[torch.Tensor]) -> str:
    """A digest of tensors' values, in order (what peers compare to agree on a state: parameters, buffers)."""
    h = blake3()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype (bf16 too)
    return h.hexdigest()
