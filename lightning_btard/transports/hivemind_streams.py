"""Sized byte streams over hivemind's P2P RPCs: the one framing that the training state (``groups/hivemind_state.py``)
and large records (``hivemind_records.py``) travel in. The first message holds the size, then 512 KiB chunks; the
receiver checks the size before it takes a byte, and never holds more than it."""

from __future__ import annotations

from collections.abc import Callable
from typing import AsyncIterator, Optional

from hivemind.proto import averaging_pb2
from hivemind.utils import MSGPackSerializer

from lightning_btard.transports.base import TransportError

__all__ = ["receive_sized", "send_sized"]

CHUNK = 512 * 1024


async def send_sized(data: bytes) -> AsyncIterator[averaging_pb2.DownloadData]:
    """The size, then ``data`` in chunks."""
    yield averaging_pb2.DownloadData(metadata=MSGPackSerializer.dumps(len(data)))
    for start in range(0, len(data), CHUNK):
        yield averaging_pb2.DownloadData(metadata=data[start : start + CHUNK])


async def receive_sized(stream: AsyncIterator[averaging_pb2.DownloadData], refuse: Callable[[int], Optional[str]],
                        error: type[TransportError] = TransportError) -> Optional[bytes]:
    """The bytes of a :func:`send_sized` stream (``None``: the sender sent nothing at all). ``refuse(size)`` says why a
    size is not accepted (raised as ``error`` before any chunk is read); more bytes than announced raise ``error`` at
    once, fewer raise :class:`TransportError`."""
    size: Optional[int] = None
    pieces: list[bytes] = []
    received = 0
    async for reply in stream:
        if size is None:
            size = int(MSGPackSerializer.loads(reply.metadata))
            problem = refuse(size)
            if problem is not None:
                raise error(problem)
            continue
        received += len(reply.metadata)
        if received > size:
            raise error(f"more bytes than the {size} announced")
        pieces.append(reply.metadata)
    if size is None:
        return None
    if received != size:
        raise TransportError(f"{received} of the {size} bytes announced")
    return b"".join(pieces)
