"""The in-process group: peers as threads of one process (tests), recovering like hivemind's does."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, Optional

from lightning_btard.groups.base import Group, NoMajority, Recovery
from lightning_btard.protocol.membership import Membership
from lightning_btard.transports.base import TransportError
from lightning_btard.transports.in_process import InProcessHub, InProcessTransport

__all__ = ["InProcessGroup", "InProcessRegistry"]


class InProcessRegistry:
    """Where in-process peers find the members still answering (the in-process stand-in for the DHT)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.announced: dict[Hashable, dict[int, Any]] = {}


class InProcessGroup(Group):
    """Peers as threads of one process (tests): one :class:`~lightning_btard.transports.in_process.InProcessHub`
    per generation of the group, and a shared registry for recovery."""

    recoverable = True

    def __init__(self, membership: Membership, peer: int, hub: InProcessHub, registry: Optional[InProcessRegistry] = None,
                 window: float = 5.0) -> None:
        self.hub, self.window = hub, window
        self.registry = registry or InProcessRegistry()
        self._attempt = 0
        super().__init__(membership, InProcessTransport(hub, membership.active.index(peer)), peer)

    def rebuild(self) -> None:
        active = self.membership.active
        hub = self.hub.child(tuple(active), key=("generation", self.membership.generation, self._attempt))
        self.transport = InProcessTransport(hub, active.index(self.peer))

    def recover(self, step: int, state: Any, failure: TransportError, accept: Callable[[Any], bool]) -> Recovery:
        active = self.membership.active
        key = ("recover", self.membership.generation, self._attempt)
        deadline = time.monotonic() + self.window
        with self.registry.cond:
            seen = self.registry.announced.setdefault(key, {})
            seen[self.peer] = state
            self.registry.cond.notify_all()
            while len(seen) < len(active) and self.registry.cond.wait(max(0.0, deadline - time.monotonic())):
                pass
            answered = dict(seen)
        members = sorted(p for p, s in answered.items() if p == self.peer or accept(s))
        refused = sorted(p for p in answered if p not in members)
        if len(members) < 2:
            raise NoMajority(f"no other peer answered within {self.window:.0f}s after a failed collective ({failure})")
        if 2 * len(members) <= len(members) + len(refused):
            raise NoMajority(f"{len(members)} peers answered at this step and {len(refused)} at another step")
        gone = [p for p in active if p not in members]
        for p in gone:
            self.membership.depart(p, step)
        self._attempt += 1
        self.rebuild()
        return Recovery(gone, {p: answered[p] for p in members})
