"""Tensor messages between hivemind peers: a P2P streaming RPC that delivers into a mailbox.

A message is a list of tensors addressed to ``(session, seq)``: the session names one transport (one
group of peers in one round), ``seq`` the collective within it. The sender is the authenticated libp2p
caller (``context.remote_id``), never a field of the message. Tensors are streamed in 64 KiB chunks
(hivemind caps unary messages at 4 MiB); a message that cannot be read, or is larger than the cap, is
delivered as :class:`Malformed` so that the protocol can treat it as the sender's fault.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import AsyncIterator, Optional, Union  # typing's, which hivemind's ServicerBase recognises as a stream

from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming
from torch import Tensor

__all__ = ["Mailbox", "Malformed", "MessageServicer"]

_DTYPES = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"}


@dataclass
class Malformed:
    """A message that arrived but could not be read as tensors (why, for the evidence log)."""

    reason: str


Message = Union[list[Tensor], Malformed]


def _deserialize(chunks: list[runtime_pb2.Tensor], count: int) -> Message:
    """Group streamed chunks into ``count`` tensors (a tensor's first chunk carries its dtype and chunk count)."""
    tensors, i = [], 0
    while i < len(chunks):
        head = chunks[i]
        if head.dtype not in _DTYPES or head.compression != runtime_pb2.CompressionType.NONE or head.chunks < 1:
            return Malformed(f"tensor {len(tensors)}: dtype {head.dtype!r}, compression {head.compression}")
        pieces = chunks[i : i + head.chunks]
        i += head.chunks
        try:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(pieces)).clone())
        except (ValueError, RuntimeError, TypeError) as e:
            return Malformed(f"tensor {len(tensors)}: {e}")
    if len(tensors) != count:
        return Malformed(f"{len(tensors)} tensors where the header announced {count}")
    return tensors


class Mailbox:
    """Messages by ``(session, seq, sender)``, awaited by the collectives; stale sessions are dropped."""

    def __init__(self, ttl: float = 600.0) -> None:
        self.ttl = ttl
        self._slots: dict[tuple[bytes, int, PeerID], asyncio.Future] = {}
        self._born: dict[bytes, float] = {}

    def _slot(self, session: bytes, seq: int, sender: PeerID) -> asyncio.Future:
        key = (session, seq, sender)
        if key not in self._slots:
            self._slots[key] = asyncio.get_running_loop().create_future()
            self._born.setdefault(session, time.monotonic())
        return self._slots[key]

    def deliver(self, session: bytes, seq: int, sender: PeerID, message: Message) -> None:
        slot = self._slot(session, seq, sender)
        if not slot.done():  # a second message for the same slot is ignored: the first one counts
            slot.set_result(message)
        self._expire()

    async def receive(self, session: bytes, seq: int, sender: PeerID) -> Message:
        return await self._slot(session, seq, sender)

    def close(self, session: bytes) -> None:
        for key in [k for k in self._slots if k[0] == session]:
            del self._slots[key]
        self._born.pop(session, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for session in [s for s, born in self._born.items() if now - born > self.ttl]:
            self.close(session)


class MessageServicer(ServicerBase):
    """The ``rpc_push`` handler of one peer (one namespace per run)."""

    _rpc_handlers = None  # ServicerBase caches handlers per class: subclasses start with their own
    _stub_type = None

    def __init__(self, mailbox: Mailbox, max_bytes: int) -> None:
        self.mailbox, self.max_bytes = mailbox, max_bytes

    async def rpc_push(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        header: Optional[tuple[bytes, int, int]] = None
        chunks: list[runtime_pb2.Tensor] = []
        size, problem = 0, None
        async for request in requests:
            if header is None:
                try:
                    session, seq, count = MSGPackSerializer.loads(request.metadata)
                    header = (bytes(session), int(seq), int(count))
                except (ValueError, TypeError):
                    return runtime_pb2.ExpertResponse(metadata=b"bad header")  # unaddressable: nothing to deliver
            for chunk in request.tensors:
                size += len(chunk.buffer)
                if size > self.max_bytes:
                    problem = f"more than {self.max_bytes} bytes"
                elif problem is None:
                    chunks.append(chunk)
        if header is None:
            return runtime_pb2.ExpertResponse(metadata=b"empty")
        session, seq, count = header
        message = Malformed(problem) if problem else _deserialize(chunks, count)
        self.mailbox.deliver(session, seq, context.remote_id, message)
        return runtime_pb2.ExpertResponse()

    @staticmethod
    async def requests(session: bytes, seq: int, tensors: Sequence[Tensor]) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        """The request stream of one message."""
        yield runtime_pb2.ExpertRequest(metadata=MSGPackSerializer.dumps([session, seq, len(tensors)]))
        for tensor in tensors:
            serialized = serialize_torch_tensor(tensor.detach().to("cpu", copy=False).contiguous())
            for chunk in split_for_streaming(serialized):
                yield runtime_pb2.ExpertRequest(tensors=[chunk])

