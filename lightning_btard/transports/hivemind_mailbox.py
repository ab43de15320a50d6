"""Tensor messages between hivemind peers: a P2P streaming RPC that delivers into a mailbox.

A message is a list of tensors addressed to ``(session, seq)``: the session names one transport (one
group of peers in one round), ``seq`` the collective within it. The sender is the authenticated libp2p
caller (``context.remote_id``), never a field of the message. Tensors are streamed in 64 KiB chunks
(hivemind caps unary messages at 4 MiB); a message that cannot be read, or is larger than the cap, is
delivered as :class:`Malformed` so that the protocol can treat it as the sender's fault.

What the mailbox holds is bounded, whoever pushes: a push is refused (before its tensors are read; an honest sender
retries until its deadline) unless its session was opened here by a transport and its sender is a member of it, and
unless its collective is at most :attr:`Mailbox.AHEAD` ahead of this peer's own (an honest member is at most one
ahead: it cannot finish a collective without this peer's part in it). A message is dropped once received; a message
for a collective this peer has passed, and not waiting for, is dropped. So a member holds at most ``AHEAD`` messages of
at most ``max_message_bytes`` each per session here, and an outsider nothing. Sessions end when their transport
closes them, or after ``ttl`` seconds without a message or a receive, never while a receive waits.
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


@dataclass
class _Session:
    members: frozenset
    at: int = 0
    """The collective this peer is at in the session (its transport's last ``seq``)."""
    waiting: int = 0
    """Receives waiting for a message."""
    active: float = 0.0
    """When a message or a receive last touched the session (``time.monotonic``)."""


class Mailbox:
    """Messages by ``(session, seq, sender)``, awaited by the collectives. Used from the node's event loop (``at`` is
    advanced from the transport's thread: a plain monotonic integer)."""

    AHEAD = 4
    """How many collectives a member's message may run ahead of this peer's (an honest member: at most one)."""

    def __init__(self, ttl: float = 600.0, max_message_bytes: int = 2**31) -> None:
        self.ttl, self.max_message_bytes = ttl, max_message_bytes
        self._slots: dict[tuple[bytes, int, PeerID], asyncio.Future] = {}
        self._sessions: dict[bytes, _Session] = {}

    def open(self, session: bytes, members: Sequence[PeerID]) -> None:
        """Accept messages of ``session`` from ``members`` (a transport calls this when it is made)."""
        if session not in self._sessions:
            self._sessions[session] = _Session(frozenset(members), active=time.monotonic())

    def advance(self, session: bytes, seq: int) -> None:
        """This peer's transport is at collective ``seq`` of ``session``."""
        s = self._sessions.get(session)
        if s is not None and seq > s.at:
            s.at = seq

    def refusal(self, session: bytes, seq: int, sender: PeerID) -> Optional[str]:
        """Why a push for ``(session, seq)`` from ``sender`` is refused before it is read (``None``: accepted)."""
        s = self._sessions.get(session)
        if s is None:
            return "no such session open here (yet)"
        if sender not in s.members:
            return "not a member of the session"
        if not 0 < seq <= s.at + self.AHEAD:
            return f"collective {seq} is not within {self.AHEAD} of this peer's {s.at}"
        return None

    def deliver(self, session: bytes, seq: int, sender: PeerID, message: Message) -> None:
        self._expire()
        s = self._sessions.get(session)
        key = (session, seq, sender)
        if s is None or (key not in self._slots and seq < s.at):
            return  # the session closed, or a collective this peer has passed (received, or given up on)
        s.active = time.monotonic()
        slot = self._slots.setdefault(key, asyncio.get_running_loop().create_future())
        if not slot.done():  # a second message for the same slot is ignored: the first one counts
            slot.set_result(message)

    async def receive(self, session: bytes, seq: int, sender: PeerID) -> Message:
        s = self._sessions.get(session)
        if s is None:
            raise RuntimeError(f"receive on session {session.hex()[:12]}, which is not open")
        self.advance(session, seq)
        key = (session, seq, sender)
        slot = self._slots.setdefault(key, asyncio.get_running_loop().create_future())
        s.waiting += 1
        try:
            return await slot
        finally:
            s.waiting -= 1
            s.active = time.monotonic()
            self._slots.pop(key, None)  # received (or given up on): nothing of it stays here

    def close(self, session: bytes) -> None:
        for key in [k for k in self._slots if k[0] == session]:
            slot = self._slots.pop(key)
            if not slot.done():
                slot.cancel()
        self._sessions.pop(session, None)

    def held(self) -> int:
        """Messages held (delivered, not yet received): for tests and the soak's memory figures."""
        return sum(1 for slot in self._slots.values() if slot.done())

    def _expire(self) -> None:
        now = time.monotonic()
        for session in [k for k, s in self._sessions.items() if s.waiting == 0 and now - s.active > self.ttl]:
            self.close(session)


class MessageServicer(ServicerBase):
    """The ``rpc_push`` handler of one peer (one namespace per run)."""

    _rpc_handlers = None  # ServicerBase caches handlers per class: subclasses start with their own
    _stub_type = None

    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox

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
                refused = self.mailbox.refusal(header[0], header[1], context.remote_id)
                if refused is not None:  # before a byte of it is read
                    return runtime_pb2.ExpertResponse(metadata=f"refused: {refused}".encode())
            for chunk in request.tensors:
                size += len(chunk.buffer)
                if size > self.mailbox.max_message_bytes:
                    problem = f"more than {self.mailbox.max_message_bytes} bytes"
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

