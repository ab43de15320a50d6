"""Large records off the DHT: the DHT carries a digest, the writer serves the bytes peer to peer.

hivemind's DHT stores values in unary messages capped at 4 MiB, and every replica holds a copy. A board record
larger than :data:`INLINE_LIMIT` (evidence with whole parts: 4–18 MB for ResNet18 or ALBERT-large parts) is kept
in its writer's :class:`RecordStore` instead, and the DHT entry is a *reference*: a marker, the record's BLAKE3
digest and its size. A reader fetches the bytes from the writer (``rpc_fetch_record``, streamed in 512 KiB chunks,
served only to members of the record's session) and keeps them only if they have that digest.

The same holds for any other large value a node stores (admission records with their chain of group changes):
:meth:`HivemindNode.store` keeps it in the *public* part of the store (served to anyone, the last
:attr:`RecordStore.KEEP_PUBLIC`) and :meth:`HivemindNode.get_signed` resolves such references before a caller sees
the entry (an entry whose bytes do not come is left out). Why 8 KiB and not hivemind's 4 MiB: every DHT call crosses
a ``multiprocessing`` pipe into hivemind's DHT process, which reads it from a non-blocking descriptor (uvloop's
``add_reader``); a call larger than 16 KiB is written in two parts, and a reader that catches the first part alone
fails with ``BlockingIOError``, loses its place in the stream and dies (``EOFError``): the peer's DHT is gone. Seen in
the swarm soak, with a 20 KB admission record.

The reference is the writer's public, signed statement (its owner-signed DHT subkey), so every reader checks the
same digest: the writer cannot show two readers two records. A reference to more than ``MAX_RECORD_BYTES`` is a
malformed record (the same for every reader). A writer that does not serve its record, or serves other bytes, is
treated by the reader as silent: the collective fails with that writer as its culprit, and the regroup's reports of
silence decide (``groups/silence.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, AsyncIterator, Optional

from blake3 import blake3
from hivemind.p2p import P2PContext, PeerID, ServicerBase
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import MSGPackSerializer

from lightning_btard.transports.base import TransportError
from lightning_btard.transports.hivemind_streams import receive_sized, send_sized

__all__ = ["INLINE_LIMIT", "PUBLIC", "RecordServicer", "RecordStore", "WrongRecord", "fetch_record", "parse_reference",
           "reference"]

INLINE_LIMIT = 8 * 1024
"""Values up to this size go into the DHT itself; larger ones by reference (the module doc says why so small)."""
_MARKER = b"\x00btard-record-ref"  # no msgpack record starts with 0x00 and goes on: never a record itself
_PUBLIC = b"\x00btard-public-ref"  # a reference to the public part of the store


class WrongRecord(TransportError):
    """A writer served other bytes than the record it published a reference to."""


def reference(data: bytes, marker: bytes = _MARKER) -> bytes:
    """The DHT value standing for ``data``."""
    return marker + blake3(data).digest() + len(data).to_bytes(8, "little")


def parse_reference(value: bytes, marker: bytes = _MARKER) -> Optional[tuple[bytes, int]]:
    """``(digest, size)`` if ``value`` is a reference (to a session's record; ``marker=PUBLIC``: to a public one)."""
    if not (isinstance(value, bytes) and value.startswith(marker) and len(value) == len(marker) + 40):
        return None
    body = value[len(marker) :]
    return body[:32], int.from_bytes(body[32:], "little")


PUBLIC = _PUBLIC


class RecordStore:
    """This node's large records, by session: the last :attr:`KEEP` of each (a reader a few collectives behind can
    still fetch them); a session's records go when its transport closes."""

    KEEP = 16
    KEEP_PUBLIC = 64

    def __init__(self) -> None:
        self._sessions: dict[bytes, tuple[frozenset, OrderedDict[bytes, bytes]]] = {}
        self._public: OrderedDict[bytes, bytes] = OrderedDict()

    def put_public(self, data: bytes) -> bytes:
        """Keep ``data`` for anyone who asks (the last :attr:`KEEP_PUBLIC`); the reference to store instead."""
        ref = reference(data, _PUBLIC)
        self._public[ref[len(_PUBLIC) : len(_PUBLIC) + 32]] = data
        self._public.move_to_end(ref[len(_PUBLIC) : len(_PUBLIC) + 32])
        while len(self._public) > self.KEEP_PUBLIC:
            self._public.popitem(last=False)
        return ref

    def put(self, session: bytes, members: Sequence[PeerID], data: bytes) -> bytes:
        """Keep ``data`` for the members of ``session``; the reference to publish instead."""
        _, records = self._sessions.setdefault(session, (frozenset(members), OrderedDict()))
        ref = reference(data)
        records[ref[len(_MARKER) : len(_MARKER) + 32]] = data
        while len(records) > self.KEEP:
            records.popitem(last=False)
        return ref

    def get(self, session: bytes, digest: bytes, caller: PeerID) -> Optional[bytes]:
        if session == b"":
            return self._public.get(digest)
        entry = self._sessions.get(session)
        if entry is None or caller not in entry[0]:
            return None
        return entry[1].get(digest)

    def close(self, session: bytes) -> None:
        self._sessions.pop(session, None)

    def held_bytes(self) -> int:
        return sum(len(d) for _, records in self._sessions.values() for d in records.values()) + sum(
            len(d) for d in self._public.values())


class RecordServicer(ServicerBase):
    """The ``rpc_fetch_record`` handler: streams a record of this node's store to a member of its session."""

    _rpc_handlers = None  # ServicerBase caches handlers per class: subclasses start with their own
    _stub_type = None

    def __init__(self, store: RecordStore) -> None:
        self.store = store

    async def rpc_fetch_record(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        try:
            session, digest = MSGPackSerializer.loads(request.metadata)
            data = self.store.get(bytes(session), bytes(digest), context.remote_id)
        except (ValueError, TypeError):
            return
        if data is None:
            return
        async for reply in send_sized(data):
            yield reply


async def _fetch(p2p: Any, namespace: str, peer: PeerID, session: bytes, digest: bytes, size: int) -> bytes:
    stub = RecordServicer.get_stub(p2p, peer, namespace=namespace)
    stream = await stub.rpc_fetch_record(runtime_pb2.ExpertRequest(metadata=MSGPackSerializer.dumps([session, digest])))
    try:
        data = await receive_sized(stream, lambda n: None if n == size else f"{n} bytes for a record of {size}", WrongRecord)
    except WrongRecord as e:
        raise WrongRecord(f"peer {peer}: {e}") from e
    except TransportError as e:
        raise TransportError(f"peer {peer} did not serve its record: {e}") from e
    if data is None:
        raise TransportError(f"peer {peer} did not serve its record")
    if blake3(data).digest() != digest:
        raise WrongRecord(f"peer {peer} served a record with another digest than the one it published")
    return data


def fetch_record(node: Any, peer: PeerID, session: bytes, digest: bytes, size: int, deadline: float) -> bytes:
    """The record ``peer`` published by reference, checked against ``digest``; retried until ``deadline``
    (``time.monotonic()``) while it is unreachable or does not serve it; :class:`TransportError` if it never comes,
    :class:`WrongRecord` at once if it serves other bytes."""
    delay, last = 0.05, None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransportError(f"could not fetch the record {digest.hex()[:12]} from {peer}: {last!r}")
        try:
            coro = asyncio.wait_for(_fetch(node.p2p, node.namespace, peer, session, digest, size), left)
            return node.run(coro, timeout=left + 5)
        except WrongRecord:
            raise
        except Exception as e:  # noqa: BLE001 - unreachable, not served (yet): again until the deadline
            last = e
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(2 * delay, 1.0)
