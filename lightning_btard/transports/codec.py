"""The one record codec below every transport: plain data in, bytes out, and back, with a size cap.

A board record is numbers, strings, bytes, ``None``, booleans, tensors (CPU copies: dtype, shape, raw bytes),
paths, and lists, tuples and dicts of these (msgpack with two extension types). Decoding runs no code of the
sender's (no pickle anywhere) and allocates no more than the bytes received, which transports cap before they
receive them (:data:`MAX_RECORD_BYTES`). What does not decode is not a record: ``None`` (or an error with
``strict``), which the protocol treats as a malformed record of its sender.
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional

import msgpack
import torch
from torch import Tensor

__all__ = ["MAX_RECORD_BYTES", "RecordTooLarge", "decode_record", "encode_record"]

MAX_RECORD_BYTES = 256 * 2**20
"""The largest board record a transport accepts from a peer (a record of evidence holds at most about one
gradient's worth of parts)."""

_TENSOR, _TUPLE, _PATH = 1, 2, 3
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                                      torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


class RecordTooLarge(ValueError):
    """A record beyond the transport's cap."""


def _pack_ext(obj: Any) -> msgpack.ExtType:
    if isinstance(obj, Tensor):
        t = obj.detach().to("cpu").contiguous()
        if str(t.dtype).removeprefix("torch.") not in _DTYPES:
            raise TypeError(f"a board record cannot hold a {t.dtype} tensor")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return msgpack.ExtType(_TENSOR, encode_record([str(t.dtype).removeprefix("torch."), list(t.shape), raw]))
    if isinstance(obj, tuple):
        return msgpack.ExtType(_TUPLE, encode_record(list(obj)))
    if isinstance(obj, pathlib.PurePath):
        return msgpack.ExtType(_PATH, encode_record(str(obj)))
    raise TypeError(f"a board record cannot hold {type(obj).__name__}")


def _unpack_ext(code: int, data: bytes) -> Any:
    if code == _TUPLE:
        return tuple(decode_record(data, strict=True))
    if code == _TENSOR:
        dtype, shape, raw = decode_record(data, strict=True)
        if not (isinstance(dtype, str) and dtype in _DTYPES and isinstance(raw, bytes) and isinstance(shape, list)
                and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise ValueError("malformed tensor in a record")
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return t.view(_DTYPES[dtype]).reshape(shape).clone()
    if code == _PATH:
        text = decode_record(data, strict=True)
        if not isinstance(text, str):
            raise ValueError("malformed path in a record")
        return pathlib.Path(text)
    raise ValueError(f"unknown record extension {code}")


def encode_record(obj: Any) -> bytes:
    """``obj`` as bytes; ``TypeError`` for anything that is not plain data."""
    return msgpack.packb(obj, default=_pack_ext, use_bin_type=True, strict_types=True)


def decode_record(data: bytes, strict: bool = False, max_bytes: Optional[int] = None) -> Any:
    """The inverse of :func:`encode_record` for untrusted bytes: plain data only, no code runs; ``None`` if the bytes
    are not a record or exceed ``max_bytes`` (``strict``: raise instead)."""
    try:
        if max_bytes is not None and len(data) > max_bytes:
            raise RecordTooLarge(f"a record of {len(data)} bytes exceeds the cap of {max_bytes}")
        return msgpack.unpackb(data, ext_hook=_unpack_ext, raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - whatever a Byzantine writer put there, it is just not a record
        if strict:
            raise
        return None
