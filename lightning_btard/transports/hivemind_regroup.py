"""Regrouping after a failed collective (hivemind backend): the members still there, agreed by all of them.

A peer that crashes or disconnects makes the collective it was due in fail, at the transport's deadline,
on every member that waited for it; members busy in another collective fail theirs in turn, because the
failed ones stop calling. Each survivor then

1. **announces** itself and its state (where it is in training) under the failed group's regroup key in
   the DHT, in a subkey only its own key signs;
2. **waits** until every member has announced or ``window`` seconds have passed (a survivor may reach
   this point up to one collective deadline after another, so the window is that deadline);
3. **confirms**: the members that announced form the next group, and publish on it the group each saw.
   Members that saw different groups fail the confirmation and regroup again from there.

Nothing here judges anybody: a member that stops answering leaves the run (it is not banned); a
Byzantine member that answers selectively is caught by the protocol's own checks in the next round.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from lightning_btard.transports.base import TransportError
from lightning_btard.transports.hivemind import HivemindTransport, decode_record, encode_record

__all__ = ["Alone", "Regrouped", "regroup"]


class Alone(TransportError):
    """No other member answered within the window: there is no group to continue in."""


@dataclass
class Regrouped:
    transport: HivemindTransport
    """The next group's transport (its members: ``members``, in the failed group's order)."""
    members: list[int]
    """The members that answered, as indices into the failed transport's members."""
    states: dict[int, Any]
    """Each member's announced state, by index into the failed transport's members."""


def _announce_and_collect(old: HivemindTransport, state: Any, window: float) -> dict[int, Any]:
    key = f"btard/{old.session.hex()}/regroup"
    node = old.node
    deadline = time.monotonic() + window
    delay = 0.02
    while not node.store(key, encode_record(state), ttl=max(600.0, 4 * window)):
        if time.monotonic() + delay > deadline:
            raise TransportError(f"could not announce this peer in the DHT within {window}s")
        time.sleep(delay)
        delay = min(2 * delay, 1.0)
    index = {peer: i for i, peer in enumerate(old.members)}
    seen: dict[int, Any] = {old.rank: state}
    while len(seen) < len(old.members) and time.monotonic() < deadline:
        for writer, value in node.get_owned(key).items():
            if writer in index and index[writer] not in seen:
                try:
                    seen[index[writer]] = decode_record(value)
                except Exception:  # noqa: BLE001 - an unreadable announcement is no announcement
                    continue
        time.sleep(old.poll_interval)
    return seen


def regroup(old: HivemindTransport, state: Any, window: float) -> Regrouped:
    """The group of ``old``'s members that are still answering, confirmed by all of them (see the module doc).

    Raises :class:`Alone` when nobody else answers within ``window`` seconds."""
    chosen = list(range(old.world_size))  # indices into the first failed transport's members
    current = old
    while True:
        seen = _announce_and_collect(current, state, window)
        members = sorted(seen)
        if len(members) < 2:
            raise Alone(f"no other peer answered within {window:.0f}s after a failed collective: this peer is alone")
        session = hashlib.sha256(current.session + b"regroup" + repr(members).encode()).digest()[:16]
        nxt = HivemindTransport(
            current.node, [current.members[i] for i in members], session, current.timeout, current.poll_interval
        )
        chosen = [chosen[i] for i in members]
        try:
            views = nxt.all_gather_object(sorted(str(current.members[i]) for i in members))
            if all(v == views[nxt.rank] for v in views):
                return Regrouped(nxt, chosen, {chosen[k]: seen[i] for k, i in enumerate(members)})
        except TransportError:
            pass  # somebody saw another group: regroup again among the members of this one
        if current is not old:
            current.close()
        current = nxt
