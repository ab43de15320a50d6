"""How independent hivemind peers become one group: each announces itself in the DHT under the run's key
(in a subkey only it can sign), waits until the expected number of peers have, and checks that every member
saw the same group before anything else happens.

The order of the group (the peers' ranks) is the order of their libp2p peer ids, a function of their identity
keys: a launcher that makes the keys beforehand knows every peer's rank (:func:`rank_order`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from hivemind.p2p import PeerID

from lightning_btard.errors import UserError
from lightning_btard.transports.base import TransportError
from lightning_btard.transports.codec import encode_record
from lightning_btard.transports.hivemind import HivemindTransport
from lightning_btard.transports.hivemind_keys import rendezvous_key, session_of
from lightning_btard.transports.hivemind_node import HivemindNode

__all__ = ["rank_order", "rendezvous"]


def rank_order(peer_ids: Sequence[PeerID]) -> list[PeerID]:
    """The group's order: by peer id."""
    return sorted(peer_ids, key=lambda p: p.to_bytes())


def rendezvous(node: HivemindNode, run_id: str, num_peers: int, timeout: float, poll_interval: float = 0.2) -> HivemindTransport:
    """Wait for ``num_peers`` peers (this one included) to announce ``run_id``; the transport over them, in rank order.

    Raises :class:`UserError` when fewer arrive within ``timeout`` seconds, when more than ``num_peers`` announce
    the run (a stale or reused ``run_id``), or when the members did not all see the same group.
    """
    key = rendezvous_key(run_id)
    deadline = time.monotonic() + timeout
    if not node.store_until(key, encode_record({"run": run_id}), max(3600.0, 2 * timeout), deadline):
        raise UserError(f"could not announce this peer in the DHT (run {run_id!r}) within {timeout}s")
    entries = node.poll_owned(key, lambda entries: len(set(entries) | {node.peer_id}) >= num_peers, deadline, poll_interval)
    seen = set(entries) | {node.peer_id}
    if len(seen) < num_peers:
        raise UserError(
            f"only {len(seen)} of {num_peers} peers joined run {run_id!r} within {timeout:.0f}s. Start the others with "
            f"initial_peers={node.visible_maddrs} (or raise the strategy's rendezvous_timeout)."
        )
    if len(seen) > num_peers:
        raise UserError(
            f"{len(seen)} peers announced run {run_id!r} but num_peers={num_peers}: another run uses this run_id "
            "(give each run its own run_id) or num_peers is wrong."
        )
    members = rank_order(list(seen))
    transport = HivemindTransport(node, members, session_of(run_id, *members, "rendezvous"), timeout=timeout)
    try:
        views = transport.all_gather_object([m.to_base58() for m in members])
    except TransportError as e:
        raise UserError(f"the peers of run {run_id!r} did not agree on the group: {e}") from e
    if any(encode_record(view) != encode_record(views[transport.rank]) for view in views):
        raise UserError(f"the peers of run {run_id!r} saw different groups: {views}")
    return transport
