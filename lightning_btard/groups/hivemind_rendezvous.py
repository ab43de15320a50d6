"""How independent hivemind peers become one group: each announces itself in the DHT under the run's key
(in a subkey only it can sign), waits until the expected number of peers have, and checks that every member
saw the same group before anything else happens.

The order of the group (the peers' ranks) is the order of their libp2p peer ids, a function of their identity
keys: a launcher that makes the keys beforehand knows every peer's rank (:func:`rank_order`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Container, Sequence
from typing import Optional

from hivemind.p2p import PeerID

from lightning_btard.errors import UserError
from lightning_btard.groups.hivemind_chain import GroupChain
from lightning_btard.transports.base import TransportError
from lightning_btard.transports.codec import decode_record, encode_record
from lightning_btard.transports.hivemind import HivemindTransport
from lightning_btard.transports.hivemind_keys import rendezvous_key, session_of
from lightning_btard.transports.hivemind_node import HivemindNode

__all__ = ["rank_order", "rendezvous"]


def rank_order(peer_ids: Sequence[PeerID]) -> list[PeerID]:
    """The group's order: by peer id."""
    return sorted(peer_ids, key=lambda p: p.to_bytes())


def rendezvous(node: HivemindNode, run_id: str, num_peers: int, timeout: float, poll_interval: float = 0.2,
               allowed: Optional[Container[str]] = None) -> HivemindTransport:
    """Wait for ``num_peers`` peers (this one included) to announce ``run_id``; the transport over them, in rank order.

    Each peer announces a fresh nonce with itself; the group's *run salt* (``transport.salt``) is a digest of every
    member's, and every session of the run derives from it, so a run restarted with the same ``run_id`` and the same
    peer identities never reads the records of the last one (they live in the DHT for hours). The members confirm the
    salt before anything else: a peer that read a stale announcement reads again until all agree.

    With an allow-list (``allowed``: base58 peer ids; ``groups/hivemind_policy.py``) only allowed peers' announcements
    count: nobody else can take a place in the group or claim the run id.

    Raises :class:`UserError` when fewer arrive within ``timeout`` seconds, when more than ``num_peers`` announce
    the run (a stale or reused ``run_id``), or when the members did not all see the same group.
    """
    key = rendezvous_key(run_id)
    deadline = time.monotonic() + timeout
    nonce = os.urandom(16)
    if allowed is not None and node.peer_id.to_base58() not in allowed:
        raise UserError(f"this peer ({node.peer_id}) is not on run {run_id!r}'s allow-list (allowed_peers)")
    if not node.store_until(key, encode_record({"run": run_id, "nonce": nonce}), max(3600.0, 2 * timeout), deadline):
        raise UserError(f"could not announce this peer in the DHT (run {run_id!r}) within {timeout}s")

    def read(entries: dict[PeerID, bytes]) -> dict[PeerID, bytes]:
        return entries if allowed is None else {w: v for w, v in entries.items() if w.to_base58() in allowed}

    while True:
        entries = read(node.poll_owned(key, lambda entries: len(set(read(entries)) | {node.peer_id}) >= num_peers, deadline,
                                       poll_interval))
        seen = set(entries) | {node.peer_id}
        if len(seen) < num_peers:
            raise UserError(
                f"only {len(seen)} of {num_peers} peers joined run {run_id!r} within {timeout:.0f}s. Start the others "
                f"with initial_peers={node.visible_maddrs} (or raise the strategy's rendezvous_timeout)."
            )
        if len(seen) > num_peers:
            raise UserError(
                f"{len(seen)} peers announced run {run_id!r} but num_peers={num_peers}: another run uses this run_id "
                "(give each run its own run_id) or num_peers is wrong."
            )
        members = rank_order(list(seen))
        nonces = {peer: _nonce(raw) for peer, raw in entries.items()}
        nonces[node.peer_id] = nonce
        salt = session_of("run", run_id, *[part for m in members for part in (m, nonces[m] or b"")])
        if all(nonces[m] is not None for m in members) and _confirmed(node, key, members, salt, deadline, poll_interval):
            break
        if time.monotonic() > deadline:
            raise UserError(f"the peers of run {run_id!r} did not agree on the run's nonces within {timeout:.0f}s "
                            "(announcements of another version of lightning-btard, or of an older run, under this run_id)")
        time.sleep(poll_interval)  # a stale announcement (an earlier run's, not yet overwritten): read again
    transport = HivemindTransport(node, members, session_of(run_id, salt, *members, "rendezvous"), timeout=timeout)
    transport.salt = salt
    # the genesis of the run's chain of groups (``hivemind_chain.py``), signed by every member: what joiners anchor on
    chain = GroupChain.genesis(run_id, salt, members, transport.session)
    signature = chain.sign(node, 0)
    try:
        views = transport.all_gather_object([[m.to_base58() for m in members], node.owner, signature])
    except TransportError as e:
        raise UserError(f"the peers of run {run_id!r} did not agree on the group: {e}") from e
    mine = encode_record(views[transport.rank][0])
    for peer, view in zip(members, views):
        if not (isinstance(view, list) and len(view) == 3 and encode_record(view[0]) == mine):
            raise UserError(f"the peers of run {run_id!r} saw different groups: {peer} saw {view!r:.300}")
        if not chain.add(0, peer.to_base58(), view[1], view[2]):
            raise UserError(f"peer {peer} of run {run_id!r} did not sign the run's first group with its identity key")
    transport.chain = chain
    return transport


def _nonce(raw: bytes) -> Optional[bytes]:
    record = decode_record(raw)
    nonce = record.get("nonce") if isinstance(record, dict) else None
    return nonce if type(nonce) is bytes and len(nonce) == 16 else None


def _confirmed(node: HivemindNode, key: str, members: Sequence[PeerID], salt: bytes, deadline: float, interval: float) -> bool:
    """Publish the salt I computed; whether every member published the same (``False``: somebody read another)."""
    confirm = f"{key}/salt"
    node.store_until(confirm, salt, 3600.0, deadline)
    wanted = set(members)
    entries = node.poll_owned(confirm, lambda e: wanted <= set(e), deadline, interval)  # members' entries only are read  # an old run's may differ: again
    return wanted <= set(entries) and all(entries[m] == salt for m in wanted)
