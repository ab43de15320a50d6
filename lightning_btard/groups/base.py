"""The Group seam: who is in the run, and the transport over them, per backend.

A group owns the :class:`Membership` (peers, bans, departures) and the transport over its active
members. The peer engine (:mod:`lightning_btard.protocol.engine`) asks it to **rebuild** the transport after bans or
admissions, and to **recover** after a collective failed because a member fell silent. Backends that
can find the members still answering (hivemind, in-process) regroup; torch.distributed cannot (a
silent rank stalls gloo/NCCL for everyone) and says so by re-raising the failure.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning_btard.protocol.membership import Membership
from lightning_btard.transports.base import Transport, TransportError

__all__ = ["Group", "NoMajority", "Recovery"]


class NoMajority(RuntimeError):
    """After a failed collective, the peers still answering do not hold a majority of the group."""


@dataclass
class Recovery:
    """The outcome of :meth:`Group.recover`: the new group is in place."""

    gone: list[int]
    """Peers (ids) that did not answer: departed (out of the run, not banned)."""
    states: dict[int, Any] = field(default_factory=dict)
    """What each remaining peer (id) announced: where it is in its step."""


class Group(ABC):
    """The members of the run on one backend and the transport over the active ones."""

    recoverable: bool = False
    """Whether :meth:`recover` can continue without a silent member (else it re-raises the failure)."""

    def __init__(self, membership: Membership, transport: Transport, peer: int) -> None:
        self.membership = membership
        self.transport = transport
        self.peer = int(peer)
        """This peer's id (stable for the run; a banned peer keeps it)."""

    @abstractmethod
    def rebuild(self) -> None:
        """A transport over ``membership.active`` (called by the active peers only, after bans or admissions)."""

    def recover(self, step: int, state: Any, failure: TransportError, accept: Callable[[Any], bool]) -> Recovery:
        """Continue with the members still answering after ``failure``; ``state`` is what this peer announces (its
        step and role), ``accept`` says whether another member's announced state may be in its group."""
        raise failure

    def leave(self) -> None:
        """This peer is out of the run (banned): release what the group holds for it."""

    def close(self) -> None:
        """The run is over for this peer."""
