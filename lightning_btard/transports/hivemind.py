"""hivemind transport: the collectives over a group of independent peers, with no torch.distributed.

Tensors go peer to peer over hivemind's P2P streaming RPC (:mod:`.hivemind_mailbox`); the public board
(:meth:`all_gather_object`) is the DHT: each member writes its record under the collective's key in a
subkey only its own RSA key can sign, and reads everyone's. Every collective has one deadline: a member
that does not deliver by then makes the collective fail with :class:`TransportError` on every peer that
waited for it (a round is all-or-nothing; the protocol decides what a missing peer means).

A session names one transport instance (a group in a round); every member derives the same session
and numbers its collectives in the same order, so messages of different rounds never mix.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Optional

import torch
from hivemind.p2p import PeerID
from torch import Tensor

from lightning_btard.transports.base import CollectiveFailure, Transport, TransportError
from lightning_btard.transports.codec import MAX_RECORD_BYTES, decode_record, encode_record
from lightning_btard.transports.hivemind_keys import board_key, session_of
from lightning_btard.transports.hivemind_mailbox import Malformed, Message, MessageServicer
from lightning_btard.transports.hivemind_node import HivemindNode
from lightning_btard.transports.hivemind_records import INLINE_LIMIT, fetch_record, parse_reference

__all__ = ["HivemindTransport"]


class HivemindTransport(Transport):
    """Collectives over ``members`` (libp2p peer ids, in the order every member agrees on).

    Args:
        node: this peer's :class:`HivemindNode` (``node.peer_id`` must be a member).
        members: the group's peer ids, ordered.
        session: bytes every member uses for this group and round (e.g. a hash of run, step and members).
        timeout: seconds any one collective may take before the missing members are reported.
        poll_interval: seconds between DHT reads while waiting for board records.
    """

    def __init__(self, node: HivemindNode, members: Sequence[PeerID], session: bytes, timeout: float = 60.0,
                 poll_interval: float = 0.02) -> None:
        self.node, self.members, self.session = node, list(members), bytes(session)
        if node.peer_id not in self.members:
            raise ValueError(f"peer {node.peer_id} is not a member of this group")
        if len(set(self.members)) != len(self.members):
            raise ValueError("a group lists a peer twice")
        self._rank = self.members.index(node.peer_id)
        self.timeout, self.poll_interval = timeout, poll_interval
        self.seq = 0
        self.salt = b""
        """The run salt of the group that formed at this transport's rendezvous (``groups/hivemind_rendezvous.py``)."""
        self.chain: Any = None
        """The run's chain of groups, its genesis signed at this transport's rendezvous (``groups/hivemind_chain.py``)."""
        node.run(self._open(), timeout=10)

    async def _open(self) -> None:
        self.node.mailbox.open(self.session, self.members)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return len(self.members)

    def _next(self) -> int:
        self.seq += 1
        self.node.mailbox.advance(self.session, self.seq)  # members' messages of the next few collectives are welcome
        return self.seq

    def close(self) -> None:
        """Forget this session's undelivered messages."""
        self.node.run(self._close(), timeout=10)

    async def _close(self) -> None:
        self.node.mailbox.close(self.session)
        self.node.records.close(self.session)

    # ---- tensors, peer to peer -------------------------------------------------------------------------
    def _messages(self, sends: Sequence[Optional[Sequence[Tensor]]], sources: Sequence[int]) -> dict[int, Message]:
        """Send ``sends[j]`` to member ``j`` (``None``: nothing) and return what each of ``sources`` sent us."""
        seq = self._next()
        return self.node.run(self._exchange(seq, sends, sources), timeout=self.timeout + 5)

    async def _exchange(self, seq: int, sends: Sequence[Optional[Sequence[Tensor]]], sources: Sequence[int]) -> dict[int, Message]:
        p2p, mailbox = self.node.p2p, self.node.mailbox

        deadline = time.monotonic() + self.timeout
        errors: dict[int, BaseException] = {}

        async def send(j: int) -> None:
            # a stream can fail to open or break on the way (p2pd under load): retried until the deadline; the
            # receiver keeps the first copy it gets
            stub = MessageServicer.get_stub(p2p, self.members[j], namespace=self.node.namespace)
            delay = 0.02
            while True:
                try:
                    left = deadline - time.monotonic()
                    reply = await stub.rpc_push(MessageServicer.requests(self.session, seq, list(sends[j])), timeout=max(left, 0.01))
                    if reply.metadata:  # refused (the receiver has not opened the session yet) or unreadable: again
                        raise TransportError(reply.metadata.decode(errors="replace"))
                    return
                except Exception as e:  # noqa: BLE001 - reported with the collective's failure
                    errors[j] = e
                    if time.monotonic() + delay >= deadline:
                        raise
                    await asyncio.sleep(delay)
                    # a refusal clears as soon as the receiver reaches this collective: ask again soon
                    delay = min(2 * delay, 0.1 if isinstance(e, TransportError) else 1.0)

        async def receive(i: int) -> Message:
            return await mailbox.receive(self.session, seq, self.members[i])

        others = [i for i in sources if i != self.rank]
        targets = [j for j, msgs in enumerate(sends) if msgs is not None and j != self.rank]
        sending = [asyncio.ensure_future(send(j)) for j in targets]
        receiving = {i: asyncio.ensure_future(receive(i)) for i in others}
        tasks = [*sending, *receiving.values()]
        done, pending = await asyncio.wait(tasks, timeout=self.timeout) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        unreached = [self.members[j] for j, task in zip(targets, sending) if task not in done or task.exception() is not None]
        silent = [self.members[i] for i, task in receiving.items() if task not in done]
        if unreached or silent:
            raise CollectiveFailure(
                f"collective {seq} of session {self.session.hex()[:12]}: no message within {self.timeout}s from "
                f"{[str(p) for p in silent]}; could not deliver to {[str(p) for p in unreached]}"
                + "".join(f"\n  {self.members[j]}: {e!r}" for j, e in errors.items() if self.members[j] in unreached),
                self.session, seq, sorted(set(silent) | set(unreached), key=self.members.index),
            )
        out = {i: task.result() for i, task in receiving.items()}
        if self.rank in sources:
            out[self.rank] = [t.clone() for t in (sends[self.rank] or [])]
        return out

    @staticmethod
    def _fits(msgs: Message, dsts: Sequence[Tensor]) -> bool:
        """Whether a message is tensors of exactly the shapes and dtypes of ``dsts``."""
        return not isinstance(msgs, Malformed) and len(msgs) == len(dsts) and all(
            src.shape == dst.shape and src.dtype == dst.dtype for src, dst in zip(msgs, dsts)
        )

    def _fill(self, messages: dict[int, Message], dsts: Sequence[Sequence[Tensor]]) -> None:
        """Copy member ``i``'s message into ``dsts[i]``; a malformed one becomes NaN (left out by the aggregators)."""
        for i, slots in enumerate(dsts):
            good = self._fits(messages[i], slots)
            for j, dst in enumerate(slots):
                if good:
                    dst.copy_(messages[i][j])  # type: ignore[index]
                else:
                    dst.fill_(float("nan"))

    def exchange(self, sends: Sequence[Sequence[Tensor]], recvs: Sequence[Sequence[Tensor]]) -> list[Optional[list[Any]]]:
        messages = self._messages(sends, range(self.world_size))
        malformed: list[Optional[list[Any]]] = []
        for i in range(self.world_size):
            msgs = messages[i]
            good = self._fits(msgs, recvs[i])
            for dst, src in zip(recvs[i], msgs if good else []):  # type: ignore[arg-type]
                dst.copy_(src)
            malformed.append(None if good else ([] if isinstance(msgs, Malformed) else list(msgs)))
        return malformed

    def scatter_parts(self, flat: Tensor, sizes: Sequence[int]) -> Tensor:
        parts = list(torch.split(flat, list(sizes)))
        messages = self._messages([[p] for p in parts], range(self.world_size))
        out = torch.empty((self.world_size, sizes[self.rank]), dtype=flat.dtype, device=flat.device)
        self._fill(messages, [[row] for row in out.unbind(0)])
        return out

    def gather_parts(self, part: Tensor, sizes: Sequence[int], out: Optional[Tensor] = None) -> Tensor:
        out = torch.empty(sum(sizes), dtype=part.dtype, device=part.device) if out is None else out
        messages = self._messages([[part]] * self.world_size, range(self.world_size))
        self._fill(messages, [[slot] for slot in torch.split(out, list(sizes))])
        return out

    def gather_parts_with_extra(
        self, part: Tensor, extra: Tensor, sizes: Sequence[int], out: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        out = torch.empty(sum(sizes), dtype=part.dtype, device=part.device) if out is None else out
        messages = self._messages([[part, extra]] * self.world_size, range(self.world_size))
        extras = torch.empty((self.world_size, *extra.shape), dtype=extra.dtype, device=extra.device)
        self._fill(messages, [[slot, e] for slot, e in zip(torch.split(out, list(sizes)), extras.unbind(0))])
        return out, extras

    def _well_formed(self, messages: dict[int, Message], like: Tensor) -> list[Tensor]:
        rows = []
        for i in sorted(messages):
            if not self._fits(messages[i], [like]):
                raise CollectiveFailure(f"peer {self.members[i]} sent a malformed message where {tuple(like.shape)} {like.dtype} "
                                        "was due", self.session, self.seq, [self.members[i]])
            rows.append(messages[i][0].to(like.device))  # type: ignore[index]
        return rows

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        stacked = torch.stack(self._well_formed(self._messages([[tensor]] * self.world_size, range(self.world_size)), tensor))
        return {"sum": stacked.sum(0), "max": stacked.amax(0), "min": stacked.amin(0)}[op]

    def broadcast_tensor_(self, tensor: Tensor, src: int = 0) -> Tensor:
        sends = [[tensor] if self.rank == src else None for _ in range(self.world_size)]
        messages = self._messages(sends, [src])
        if self.rank != src:
            tensor.copy_(self._well_formed({src: messages[src]}, tensor)[0])
        return tensor

    def barrier(self) -> None:
        self._messages([[]] * self.world_size, range(self.world_size))

    # ---- the public board: DHT records ---------------------------------------------------------------
    def _board(self, obj: Any, writers: Sequence[int], publish: bool) -> dict[int, Any]:
        seq = self._next()
        key = board_key(self.session, seq)
        deadline = time.monotonic() + self.timeout
        if publish:
            data = encode_record(obj)
            if len(data) > INLINE_LIMIT:  # too large for the DHT: a reference, and the bytes served from here
                data = self.node.records.put(self.session, self.members, data)
            self.publish(key, data, deadline)
        wanted = {self.members[i]: i for i in writers}
        found: dict[int, Any] = {}
        unserved: dict[PeerID, str] = {}

        def complete(entries: dict[PeerID, bytes]) -> bool:
            for writer, value in entries.items():
                if writer in wanted and wanted[writer] not in found and writer not in unserved:
                    ref = parse_reference(value)
                    if ref is None:
                        found[wanted[writer]] = decode_record(value)
                    elif ref[1] > MAX_RECORD_BYTES:
                        found[wanted[writer]] = None  # the same malformed reference for every reader
                    else:
                        try:
                            mine = self.node.records.get(self.session, ref[0], writer) if writer == self.node.peer_id else None
                            data = mine if mine is not None else fetch_record(self.node, writer, self.session, ref[0], ref[1],
                                                                              deadline)
                        except TransportError as e:  # not served, or other bytes: as if it said nothing
                            unserved[writer] = str(e)
                            continue
                        found[wanted[writer]] = decode_record(data)
            return len(found) + len(unserved) == len(wanted)

        self.node.poll_owned(key, complete, deadline, self.poll_interval)
        if len(found) < len(wanted):
            missing = [self.members[i] for i in writers if i not in found]
            raise CollectiveFailure(f"board record {key}: nothing within {self.timeout}s from {[str(m) for m in missing]}"
                                    + "".join(f"\n  {w}: {why}" for w, why in unserved.items()), self.session, seq, missing)
        return found

    def publish(self, key: str, value: bytes, deadline: float) -> None:
        """Store my record under ``key`` (my owner subkey), retried until the ``deadline`` (``time.monotonic()``):
        a DHT store fails when no replica answers in time."""
        if not self.node.store_until(key, value, max(600.0, 4 * self.timeout), deadline):
            raise TransportError(f"could not store board record {key} in the DHT within {self.timeout}s")

    def all_gather_object(self, obj: Any) -> list[Any]:
        found = self._board(obj, range(self.world_size), publish=True)
        found[self.rank] = obj
        return [found[i] for i in range(self.world_size)]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if self.rank == src:
            self._board(obj, [], publish=True)
            return obj
        return self._board(None, [src], publish=False)[src]

    def subgroup(self, members: Sequence[int]) -> Optional[Transport]:
        chosen = sorted(set(members))
        seq = self._next()  # every member calls subgroup in the same order, so all derive the same session
        if self.rank not in chosen:
            return None
        session = session_of(self.session, "subgroup", seq, *chosen)
        return HivemindTransport(self.node, [self.members[m] for m in chosen], session, self.timeout, self.poll_interval)
