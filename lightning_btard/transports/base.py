"""The transport interface: the only code that moves bytes between peers.

The protocol layer speaks to peers only through these collectives over the current *members*
(ranks ``0..world_size-1`` in the order every peer agrees on). torch.distributed, hivemind and the
in-process transport for tests implement the same interface, so the same protocol runs on each.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Optional

from torch import Tensor

__all__ = ["CollectiveFailure", "Transport", "TransportError"]


class TransportError(RuntimeError):
    """A peer could not be reached or answered out of protocol within the transport's timeout."""


class CollectiveFailure(TransportError):
    """A collective failed because of named members: no (well-formed) message from them within the deadline, or they
    would not take ours. What a peer reports after it (``groups/silence.py``): the session, the collective's number and
    the members it did not hear from."""

    def __init__(self, message: str, session: bytes, seq: int, culprits: Sequence[Any]) -> None:
        super().__init__(message)
        self.session, self.seq, self.culprits = bytes(session), int(seq), list(culprits)


class Transport(ABC):
    """Collectives over an ordered set of peers."""

    @property
    @abstractmethod
    def rank(self) -> int:
        """This peer's index among the members."""

    @property
    @abstractmethod
    def world_size(self) -> int:
        """Number of members."""

    def exchange(self, sends: Sequence[Sequence[Tensor]], recvs: Sequence[Sequence[Tensor]]) -> list[Optional[list[Any]]]:
        """Send the tensors ``sends[j]`` to member ``j``; fill ``recvs[i]`` (preallocated, shapes known to the
        protocol) with what member ``i`` sent us. Messages may differ per destination; our own slot is copied.
        Returns, per member, ``None`` when its message had the expected shapes and dtypes, else the message
        as received (malformed: evidence for the protocol)."""
        raise NotImplementedError(f"{type(self).__name__} has no per-destination exchange")

    @abstractmethod
    def scatter_parts(self, flat: Tensor, sizes: Sequence[int]) -> Tensor:
        """Send contiguous part ``j`` of ``flat`` (``sizes[j]`` elements) to member ``j``.

        Returns ``[world_size, sizes[rank]]``: row ``i`` is the part member ``i`` sent to us. The result
        may live in a buffer that the next ``scatter_parts`` call reuses.
        """

    @abstractmethod
    def gather_parts(self, part: Tensor, sizes: Sequence[int], out: Optional[Tensor] = None) -> Tensor:
        """Every member contributes its part (member ``i``: ``sizes[i]`` elements); returns their concatenation
        in rank order, written into ``out`` when given."""

    def gather_parts_with_extra(
        self, part: Tensor, extra: Tensor, sizes: Sequence[int], out: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`gather_parts`, plus a small ``extra`` tensor from every member (same shape everywhere),
        returned stacked as ``[world_size, *extra.shape]``. Transports may send both in one exchange."""
        values = self.gather_parts(part, sizes, out=out)
        extras = self.gather_parts(extra.reshape(-1), [extra.numel()] * self.world_size)
        return values, extras.view(self.world_size, *extra.shape)

    @abstractmethod
    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """``op`` in ``sum | max | min`` of ``tensor`` over members; returns a new tensor."""

    @abstractmethod
    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every member's record (plain data: :mod:`.codec`), in rank order: the public board. A member's record that
        is malformed or too large is ``None``."""

    @abstractmethod
    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Member ``src``'s ``obj`` on every member."""

    @abstractmethod
    def broadcast_tensor_(self, tensor: Tensor, src: int = 0) -> Tensor:
        """Overwrite ``tensor`` in place with member ``src``'s."""

    @abstractmethod
    def barrier(self) -> None:
        """Wait until every member arrives."""

    @abstractmethod
    def subgroup(self, members: Sequence[int]) -> Optional["Transport"]:
        """A transport over ``members`` only (called by every member); ``None`` on non-members."""
