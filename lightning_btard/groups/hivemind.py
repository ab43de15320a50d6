"""The hivemind group: independent peers that met in the DHT (``groups/hivemind_rendezvous.py``), each member a
libp2p peer id; after a ban or an admission a new session over the active members; after a member fell silent, a
regroup among those still answering (``groups/hivemind_regroup.py``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Optional

from hivemind.p2p import PeerID

from lightning_btard.groups.base import Group, NoMajority, Recovery
from lightning_btard.groups.hivemind_chain import GroupChain
from lightning_btard.groups.hivemind_regroup import Alone, regroup
from lightning_btard.protocol.membership import Membership
from lightning_btard.transports.base import CollectiveFailure, TransportError
from lightning_btard.transports.hivemind import HivemindTransport
from lightning_btard.transports.hivemind_keys import session_of
from lightning_btard.transports.hivemind_node import HivemindNode

__all__ = ["HivemindGroup"]

log = logging.getLogger(__name__)


class HivemindGroup(Group):
    """``members[p]`` is peer ``p``'s libp2p id; the transport covers the active ones, in id order."""

    recoverable = True

    def __init__(self, node: HivemindNode, run_id: str, members: Sequence[PeerID], membership: Membership, peer: int,
                 timeout: float, transport: HivemindTransport | None = None, salt: bytes = b"",
                 chain: Optional[GroupChain] = None) -> None:
        self.node, self.run_id, self.members, self.timeout = node, run_id, list(members), float(timeout)
        self.salt = bytes(salt)
        """The run's salt (``rendezvous``): in every session name, so a restarted run never meets the last one's."""
        self.chain = chain
        """The run's chain of groups (``hivemind_chain.py``): extended and signed at every change, what joiners verify."""
        self.silenced: dict[str, int] = {}
        """Peer id (base58) → how many times the group lost it in a regroup (silent, or removed after the reports of
        silence: ``silence.py``); the same on every member (joiners get it with their admission). Admission refuses a
        peer id lost ``silence.SILENCES_BEFORE_OUT`` times: an identity that joins and never takes part costs the
        group one collective deadline, twice at most."""
        if transport is None:
            transport = self._transport(membership)
        super().__init__(membership, transport, peer)

    def _transport(self, membership: Membership) -> HivemindTransport:
        members = [self.members[p] for p in membership.active]
        session = session_of(self.run_id, self.salt, *members, "group", membership.generation)
        return HivemindTransport(self.node, members, session, timeout=self.timeout)

    def rebuild(self) -> None:
        old = self.transport
        self.transport = self._transport(self.membership)
        if isinstance(old, HivemindTransport):
            old.close()
        self._changed()

    def _changed(self) -> None:
        """The group changed: its statement joins the chain, signed by this member (it was in the group before)."""
        if self.chain is not None:
            assert isinstance(self.transport, HivemindTransport)
            self.chain.extend(self.transport.members, self.transport.session)
            self.chain.publish(self.node)

    def reorder(self, draw: bytes) -> list[int]:
        """A fresh group's order from a draw no member chose (``mprng.draw``): by ``digest(draw, peer id)``. Peer-id
        order can be ground (anyone can make identities until one sorts first); this one cannot. Returns the old
        ids in their new order; this peer's id and the transport follow (a change of the chain, signed by all)."""
        from lightning_btard.protocol.digest import digest

        assert not self.membership.bans and not self.membership.departed and len(self.members) == len(self.membership.peers)
        order = sorted(range(len(self.members)), key=lambda i: digest(draw, self.members[i].to_bytes()))
        self.members = [self.members[i] for i in order]
        self.peer = order.index(self.peer)
        self.rebuild()
        return order

    def admit(self, peers: Sequence[PeerID]) -> list[int]:
        """Peers joining the running group: their ids (the next free ones), and the group rebuilt with them."""
        ids = self.membership.admit(len(peers))
        self.members += list(peers)
        self.rebuild()
        return ids

    def recover(self, step: int, state: Any, failure: TransportError, accept: Callable[[Any], bool]) -> Recovery:
        old, active = self.transport, self.membership.active
        assert isinstance(old, HivemindTransport)
        report = None
        if isinstance(failure, CollectiveFailure) and failure.session == old.session:
            report = [old.session, failure.seq, [str(p) for p in failure.culprits]]
        try:
            result = regroup(old, state, window=self.timeout, accept=accept, report=report)
        except Alone as err:
            raise NoMajority(f"BTARD: step {step}: {err} (the failure: {failure})") from err
        elsewhere = [i for i in result.refused if i not in result.removed]  # at another step, malformed, outvoted
        if elsewhere and 2 * len(result.members) <= len(result.members) + len(elsewhere):
            # peers that answered from another step are as many as this group: neither side may claim to be the run
            raise NoMajority(
                f"BTARD: step {step}: after a failed collective, {len(result.members)} peers answered at this step and "
                f"{len(result.refused)} at another step or malformed, so no group holds a majority. Restart the peers "
                "that stopped here: while the run is marked as running they ask to join it and download its state"
            )
        gone = [p for i, p in enumerate(active) if i not in result.members]
        for i, peer in ((i, p) for i, p in enumerate(active) if p in gone):
            self.membership.depart(peer, step)
            key = str(old.members[i])  # silent, removed after the reports of silence, or at another step: lost once more
            self.silenced[key] = self.silenced.get(key, 0) + 1
            if i in result.removed:
                log.warning("BTARD: step %d: peer %d (%s) leaves the group: %s", step, peer, key, result.removed[i])
        old.close()
        self.transport = result.transport
        self._changed()
        return Recovery(gone, {active[i]: s for i, s in result.states.items()})

    def close(self) -> None:
        if isinstance(self.transport, HivemindTransport):
            self.transport.close()
