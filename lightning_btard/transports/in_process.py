"""In-process transport: n peers as threads of one process, for protocol tests with scripted peers."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_btard.transports.base import Transport, TransportError
from lightning_btard.transports.codec import decode_record, encode_record

__all__ = ["InProcessHub", "InProcessTransport"]


class InProcessHub:
    """The shared meeting point of ``n`` in-process peers: a slot per peer and a barrier."""

    def __init__(self, n: int, timeout: float = 60.0) -> None:
        self.n = n
        self.timeout = timeout
        self.slots: list[Any] = [None] * n
        self.barrier = threading.Barrier(n)
        self.children: dict[tuple[Any, ...], InProcessHub] = {}
        self.lock = threading.Lock()

    def exchange(self, rank: int, value: Any, take: Optional[Callable[[list[Any]], Any]] = None) -> Any:
        """Every peer posts ``value``; each gets all posted values (deep-copied: no shared tensors), or
        ``take(values)``, which must copy what it keeps (it runs while every peer's value is still posted: the
        transfers of simulated peers copy only what is addressed to them)."""
        try:
            self.slots[rank] = value
            self.barrier.wait(self.timeout)
            out = take(self.slots) if take is not None else [copy.deepcopy(v) if i != rank else v for i, v in enumerate(self.slots)]
            self.barrier.wait(self.timeout)
        except threading.BrokenBarrierError as e:
            self.barrier.abort()
            raise TransportError(f"in-process peers did not meet within {self.timeout}s") from e
        return out

    def child(self, members: tuple[int, ...], key: Any = None) -> "InProcessHub":
        """The hub of a group of ``members`` (one per ``(members, key)``: a later group of the same peers is new)."""
        with self.lock:
            if (members, key) not in self.children:
                self.children[(members, key)] = InProcessHub(len(members), self.timeout)
            return self.children[(members, key)]


class InProcessTransport(Transport):
    """Peer ``rank`` of an :class:`InProcessHub`."""

    def __init__(self, hub: InProcessHub, rank: int) -> None:
        self.hub, self._rank = hub, rank

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self.hub.n

    def exchange(self, sends: Sequence[Sequence[Tensor]], recvs: Sequence[Sequence[Tensor]]) -> list[Optional[list[Any]]]:
        def receive(slots: list[Any]) -> list[Optional[list[Any]]]:
            """Copy what is addressed to this peer into ``recvs`` (a malformed message is kept, as a copy)."""
            malformed: list[Optional[list[Any]]] = []
            for i, theirs in enumerate(slots):
                msgs = list(theirs[self.rank])
                good = len(msgs) == len(recvs[i]) and all(
                    isinstance(src, Tensor) and dst.shape == src.shape and dst.dtype == src.dtype for dst, src in zip(recvs[i], msgs)
                )
                for dst, src in zip(recvs[i], msgs if good else []):
                    dst.copy_(src)
                malformed.append(None if good else copy.deepcopy(msgs))
            return malformed

        return self.hub.exchange(self.rank, [list(msgs) for msgs in sends], receive)

    def scatter_parts(self, flat: Tensor, sizes: Sequence[int]) -> Tensor:
        return self.hub.exchange(self.rank, list(torch.split(flat, list(sizes))),
                                 lambda slots: torch.stack([parts[self.rank] for parts in slots]))

    def gather_parts(self, part: Tensor, sizes: Sequence[int], out: Optional[Tensor] = None) -> Tensor:
        return self.hub.exchange(self.rank, part, lambda pieces: torch.cat(pieces) if out is None else torch.cat(pieces, out=out))

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        stacked = self.hub.exchange(self.rank, tensor, torch.stack)
        return {"sum": stacked.sum(0), "max": stacked.amax(0), "min": stacked.amin(0)}[op]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Records cross as bytes of the record codec, as on every other transport."""
        return [decode_record(data) for data in self.hub.exchange(self.rank, encode_record(obj))]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        data = self.hub.exchange(self.rank, encode_record(obj) if self.rank == src else None)[src]
        return obj if self.rank == src else decode_record(data)

    def broadcast_tensor_(self, tensor: Tensor, src: int = 0) -> Tensor:
        return self.hub.exchange(self.rank, tensor, lambda slots: tensor.copy_(slots[src]) if self.rank != src else tensor)

    def barrier(self) -> None:
        self.hub.exchange(self.rank, None)

    def subgroup(self, members: Sequence[int]) -> Optional[Transport]:
        members_t = tuple(sorted(members))
        self.barrier()  # a collective, like torch.distributed.new_group
        if self.rank not in members_t:
            return None
        return InProcessTransport(self.hub.child(members_t), members_t.index(self.rank))
