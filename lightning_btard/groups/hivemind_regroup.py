"""Regrouping after a failed collective (hivemind backend): the members still there, agreed by all of them.

A peer that crashes or disconnects makes the collective it was due in fail, at the transport's deadline,
on every member that waited for it; members busy in another collective fail theirs in turn, because the
failed ones stop calling. Each survivor then

1. **announces** itself and its state (where it is in training) under the failed group's regroup key in
   the DHT, in a subkey only its own key signs;
2. **waits** until every member has announced or ``window`` seconds have passed (a survivor may reach
   this point up to one collective deadline after another, so the window is that deadline);
3. **confirms**: the members that announced form the next group, and publish on it the group and the
   states each saw. The view a strict majority of them published is the group's: its members that published
   another view are left out (a Byzantine member that confirms differently each time is outvoted, it no longer
   stops everybody), and a member outside that view, or the minority, learns it is out (:class:`Alone`). With no
   majority view, all announce again, under the same key with the next attempt number, so they meet again.

Nothing here judges anybody: a member that stops answering leaves the run (it is not banned); a
Byzantine member that answers selectively is caught by the protocol's own checks in the next round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from lightning_btard.groups.silence import parse_report, silence_removals
from lightning_btard.protocol.agreement import strict_majority
from lightning_btard.transports.base import TransportError
from lightning_btard.transports.codec import decode_record, encode_record
from lightning_btard.transports.hivemind import HivemindTransport
from lightning_btard.transports.hivemind_keys import regroup_key, session_of

__all__ = ["Alone", "Regrouped", "Removed", "regroup"]


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
    refused: list[int]
    """Members that answered but are not in the group: a state ``accept`` refused (malformed, or at another step),
    another view than the majority's, or removed after the reports of silence."""
    removed: dict[int, str] = field(default_factory=dict)
    """Members removed after the reports of silence (``silence.py``), with the reason."""


class Removed(Alone):
    """The agreed reports of silence remove this peer from the group (``silence.py``)."""


def _announce_and_collect(
    old: HivemindTransport, key: str, state: Any, window: float, accept: Callable[[Any], bool]
) -> tuple[dict[int, Any], set[int]]:
    """Announce; collect the accepted announcements (by member index) and the members whose announcement was not."""
    deadline = time.monotonic() + window
    old.publish(key, encode_record(state), deadline)
    index = {peer: i for i, peer in enumerate(old.members)}
    seen: dict[int, Any] = {old.rank: state}
    refused: set[int] = set()

    def everyone(entries: dict[Any, bytes]) -> bool:
        for writer, value in entries.items():
            i = index.get(writer)
            if i is None or i in seen or i in refused:
                continue
            announced = decode_record(value)  # None when unreadable: refused like a wrong one
            if isinstance(announced, list) and len(announced) == 2 and accept(announced[0]):
                seen[i] = announced
            else:  # malformed, or not where I am: left out
                refused.add(i)
        return len(seen) + len(refused) >= len(old.members)

    old.node.poll_owned(key, everyone, deadline, old.poll_interval)
    return seen, refused


def regroup(
    old: HivemindTransport, state: Any, window: float, accept: Callable[[Any], bool] = lambda state: True, attempts: int = 5,
    report: Any = None,
) -> Regrouped:
    """The group of ``old``'s members that are still answering, confirmed by all of them (see the module doc).

    ``accept(state)`` says whether another member's announced state can be in my group (a malformed one, or one at
    another step, cannot: that member is left out). Every attempt announces under the failed group's key with the
    attempt's number, so members whose first confirmation failed meet again. Raises :class:`Alone` when nobody else
    is accepted within ``window`` seconds, this peer is outside the majority's view, or no view had a strict majority in
    ``attempts`` confirmations; :class:`Removed` when the agreed reports of silence remove this peer (``silence.py``).

    ``report``: whom this peer did not hear from, ``[session, collective, [peer id (base58), ...]]``, announced with
    the state; the confirmed group then leaves out the members :func:`~lightning_btard.groups.silence.silence_removals`
    names (in :attr:`Regrouped.removed`)."""
    for attempt in range(attempts):
        seen, refused = _announce_and_collect(old, regroup_key(old.session, attempt), [state, report], window, accept)
        members = sorted(seen)
        if len(members) < 2:
            raise Alone(f"no other peer answered within {window:.0f}s after a failed collective: this peer is alone")
        session = session_of(old.session, "regroup", attempt, *members)
        nxt = HivemindTransport(old.node, [old.members[i] for i in members], session, old.timeout, old.poll_interval)
        view = [[str(old.members[i]), seen[i]] for i in members]  # who, and what each announced
        try:
            views = [encode_record(v) for v in nxt.all_gather_object(view)]  # compared as bytes, never with ==
        except TransportError:
            nxt.close()  # somebody in my view did not confirm: try again, all under the next attempt's key
            continue
        agreed = strict_majority(views)
        if agreed is None:
            nxt.close()
            continue
        if agreed != encode_record(view):
            nxt.close()
            raise Alone(f"a majority of the peers that answered after a failed collective saw another group than this "
                        f"peer did: it is out of the run (attempt {attempt})")
        confirmed = [i for i, v in zip(members, views) if v == agreed]
        names = {i: str(old.members[i]) for i in confirmed}
        reports = {names[i]: parse_report(seen[i][1], old.session, list(names.values())) for i in confirmed}
        verdict = silence_removals(reports, list(names.values()))
        removed = {i: verdict[names[i]] for i in confirmed if names[i] in verdict}
        if old.rank in removed:
            nxt.close()
            raise Removed(f"this peer leaves the group: {removed[old.rank]}. It can ask to join the run again (restart it)")
        staying = [i for i in confirmed if i not in removed]
        if len(staying) < 2:
            nxt.close()
            raise Alone("after the reports of silence, no other peer stays in the group: this peer is alone")
        states = {i: seen[i][0] for i in staying}
        left_out = sorted(refused | (set(members) - set(staying)))
        if staying == members:
            return Regrouped(nxt, members, states, left_out)
        nxt.close()  # members that confirmed another view, or reported or named as silent, are left out
        final = HivemindTransport(old.node, [old.members[i] for i in staying],
                                  session_of(old.session, "regroup", attempt, "confirmed", *staying), old.timeout, old.poll_interval)
        return Regrouped(final, staying, states, left_out, removed)
    raise Alone(f"the peers that answered after a failed collective did not agree on a group in {attempts} attempts "
                "(no view of a strict majority)")
