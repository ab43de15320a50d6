"""Peers joining a running group (hivemind backend), and banned peers refused at the door.

A run's members mark it as running in the DHT (:func:`announce_running`). A peer that starts later finds that
mark and, instead of the rendezvous, **asks to join**: it announces its signing key and a fresh nonce under
the run's join key, in a subkey only its own RSA key can sign (:func:`ask_to_join`). Every ``join_every``
steps, at a step boundary, the members

1. **agree on the joiners** (:func:`agree_on_joiners`, one board collective): each lists the join requests it
   sees; a request listed by a majority of the members is admitted, unless its peer id was banned;
2. **write an admission record** for each joiner, in their own subkeys (:func:`publish_admission`): the step,
   the group before and after, every member's signing key, the run's seed, the ban list, and the digest of the
   member's shared training state; a banned peer gets a refusal instead;
3. **offer their state** (``hivemind_state.py``) and continue in the new group, whose first collective waits
   for the joiner up to the collective deadline.

The joiner (:func:`wait_for_admission`) believes a record only when a strict majority of a group wrote it
identically, and that group is the head of a chain of group changes that verifies from the joiner's own anchor
(``hivemind_chain.py``: the statements a member it trusts signed, or the one first group the run's members name),
and its state only when the state's digest is that record's (:func:`download_agreed_state`). A Byzantine minority
can therefore neither admit a peer nor keep one out, nor hand a joiner a wrong model, and no identity outside the
run can name a group of its own to a joiner: what fresh identities can do is claim the run id with a first group of
their own, which stops joiners that trust nobody in particular with an error (never a wrong group).
"""

from __future__ import annotations

import os
import random
import time
from collections import defaultdict
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from hivemind.p2p import PeerID

from lightning_btard.errors import UserError
from lightning_btard.groups.hivemind_chain import GroupChain, anchor_of, verify_chain
from lightning_btard.groups.hivemind_policy import MAX_LISTED, AdmissionPolicy
from lightning_btard.groups.hivemind_state import download_state
from lightning_btard.transports.base import TransportError
from lightning_btard.transports.codec import decode_record, encode_record
from lightning_btard.transports.hivemind import HivemindTransport
from lightning_btard.transports.hivemind_keys import admit_key, join_key, running_key
from lightning_btard.transports.hivemind_node import HivemindNode

__all__ = [
    "JoinRequest", "Refused", "agree_on_joiners", "announce_finished", "announce_running", "ask_to_join", "download_agreed_state",
    "publish_admission", "publish_refusal", "run_is_running", "wait_for_admission",
]

_TTL = 3600.0


class Refused(UserError):
    """A majority of the run's members refused this peer (it was banned)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        """The members' reason, as they wrote it."""


@dataclass(frozen=True)
class JoinRequest:
    peer: PeerID
    key: bytes
    """The joiner's Ed25519 public key (32 bytes): the signer of its protocol messages."""
    nonce: bytes
    """Fresh per attempt: an admission record of an earlier attempt (still in the DHT) is not this one's."""

    def view(self) -> list[Any]:
        return [self.peer.to_base58(), self.key, self.nonce]


def _store(node: HivemindNode, key: str, value: Any, deadline: float, ttl: float = _TTL) -> None:
    if not node.store_until(key, encode_record(value), ttl, deadline):
        raise TransportError(f"could not store {key} in the DHT")


def announce_running(node: HivemindNode, run_id: str, step: int, genesis: bytes = b"", timeout: float = 30.0) -> None:
    """Mark the run as running (a member's own subkey; refreshed by the members, it expires an hour after the last),
    naming the digest of the run's first group (``genesis``): the anchor of joiners that trust no peer in particular."""
    _store(node, running_key(run_id), {"step": int(step), "genesis": bytes(genesis)}, time.monotonic() + timeout)


def announce_finished(node: HivemindNode, run_id: str, step: int, timeout: float = 10.0) -> None:
    """Mark this member's part of the run as finished (peers still asking to join are told the run is over)."""
    _store(node, running_key(run_id), {"step": int(step), "finished": True}, time.monotonic() + timeout)


def run_is_running(node: HivemindNode, run_id: str, allowed: Optional[Container[str]] = None) -> bool:
    """Whether members of ``run_id`` have marked it as running and not all of them as finished (a peer that starts
    now joins instead of meeting the others); with an allow-list, only allowed peers' marks count."""
    for writer, raw in node.get_owned(running_key(run_id)).items():
        record = decode_record(raw)
        if allowed is not None and writer.to_base58() not in allowed:
            continue
        if writer != node.peer_id and not (isinstance(record, dict) and record.get("finished")):
            return True
    return False


def ask_to_join(node: HivemindNode, run_id: str, key: bytes, wait: float = _TTL, timeout: float = 30.0) -> bytes:
    """Announce this peer's wish to join, with its signing key, for ``wait`` seconds (then the request expires);
    returns the attempt's nonce."""
    nonce = os.urandom(16)
    _store(node, join_key(run_id), {"key": bytes(key), "nonce": nonce}, time.monotonic() + timeout, ttl=wait + 60.0)
    return nonce


def _join_requests(node: HivemindNode, run_id: str) -> list[JoinRequest]:
    out = []
    for writer, raw in node.get_owned(join_key(run_id)).items():
        record = decode_record(raw)
        if isinstance(record, dict) and isinstance(record.get("key"), bytes) and len(record["key"]) == 32 \
                and isinstance(record.get("nonce"), bytes) and len(record["nonce"]) == 16:
            out.append(JoinRequest(writer, record["key"], record["nonce"]))
    return out


def agree_on_joiners(
    transport: HivemindTransport, run_id: str, members: Iterable[PeerID], banned: Iterable[PeerID],
    admitted_before: Iterable[bytes] = (), policy: Optional[AdmissionPolicy] = None, salt: bytes = b"", step: int = 0,
    banned_keys: Iterable[bytes] = (),
) -> tuple[list[JoinRequest], list[PeerID]]:
    """One board collective over the group: the join requests a majority of members saw that ``policy`` admits now
    (sorted by peer id), and the refused peers asking to join that this member saw: banned ones, the peers the policy
    ties to them, and requests with the signing key of a banned member (each member refuses those on its own).
    Requests whose nonce was admitted before are old ones (a member that joined and left since): never admitted
    twice. Each member lists at most ``hivemind_policy.MAX_LISTED`` requests (allowed ones, in an order nobody
    chooses), so a flood of requests costs a bounded read and a bounded collective."""
    policy = policy if policy is not None else AdmissionPolicy()
    members, old, bad_keys = set(members), set(admitted_before), set(banned_keys)
    refused_ids = policy.tied(p.to_base58() for p in banned)
    requests = [r for r in _join_requests(transport.node, run_id) if r.peer not in members and r.nonce not in old]
    refused_requests = [r for r in requests if r.peer.to_base58() in refused_ids or r.key in bad_keys]
    refused = sorted({r.peer for r in policy.listed(refused_requests, salt, step)}, key=lambda p: p.to_bytes())
    candidates = [r for r in requests if r.peer not in refused and r.peer.to_base58() not in refused_ids]
    mine = sorted((r.view() for r in policy.listed(candidates, salt, step)), key=lambda v: v[0])
    views = transport.all_gather_object(mine)
    counts: dict[tuple, int] = defaultdict(int)
    for view in views:
        if not isinstance(view, list) or len(view) > MAX_LISTED:
            continue
        # exact types: anything else (a list, a tensor) cannot come from an honest member, and must not crash us
        for item in {tuple(v) for v in view if type(v) is list and len(v) == 3
                     and type(v[0]) is str and type(v[1]) is bytes and type(v[2]) is bytes}:
            counts[item] += 1
    admitted = []
    for (peer, key, nonce), count in counts.items():
        if 2 * count <= transport.world_size or peer in refused_ids or not policy.allows(peer) or key in bad_keys:
            continue
        try:
            pid = PeerID.from_base58(peer)
        except Exception:  # noqa: BLE001 - a malformed entry a majority listed cannot come from honest members
            continue
        if pid not in members and nonce not in old:
            admitted.append(JoinRequest(pid, key, nonce))
    # one request per peer id (the same peer asking twice with two nonces: the one a majority saw first in order)
    unique: dict[PeerID, JoinRequest] = {}
    for request in sorted(admitted, key=lambda r: (r.peer.to_bytes(), r.nonce)):
        unique.setdefault(request.peer, request)
    chosen = policy.choose(list(unique.values()), salt, step)
    return sorted(chosen, key=lambda r: r.peer.to_bytes()), refused


def publish_admission(node: HivemindNode, run_id: str, request: JoinRequest, record: dict[str, Any], timeout: float) -> None:
    """This member's admission record for ``request`` (the same content on every member in sync)."""
    _store(node, admit_key(run_id, request.peer), {**record, "nonce": request.nonce}, time.monotonic() + timeout)


def publish_refusal(node: HivemindNode, run_id: str, peer: PeerID, group: Sequence[PeerID], reason: str, timeout: float,
                    chain: Optional[GroupChain] = None) -> None:
    """This member's refusal of ``peer`` (banned), for the group ``group`` (the head of ``chain``)."""
    record: dict[str, Any] = {"refused": reason, "group": [m.to_base58() for m in group]}
    if chain is not None:
        record["chain"] = chain.to_record()
    _store(node, admit_key(run_id, peer), record, time.monotonic() + timeout)


def _agreed(records: dict[PeerID, bytes], run_id: str, trusted: Iterable[str], anchor: Optional[bytes]) -> list[tuple[dict[str, Any], GroupChain]]:
    """The records a strict majority of a group wrote identically (their chains aside), where that group is the head
    of a chain that verifies from the joiner's anchor (``hivemind_chain.verify_chain``); each with that chain."""
    writers: dict[bytes, dict[str, Any]] = defaultdict(dict)
    for writer, raw in records.items():
        record = decode_record(raw)
        if not isinstance(record, dict):
            continue
        chain = record.pop("chain", None)
        writers[encode_record(record)][writer.to_base58()] = chain
    out = []
    for raw, chains in writers.items():
        record = decode_record(raw)
        group = record.get("group")
        if not isinstance(group, list) or not group or not all(type(m) is str for m in group):
            continue
        for chain_record in chains.values():
            try:
                chain = verify_chain(chain_record, run_id, trusted, anchor)
            except ValueError:
                continue
            if chain.head.members == group and 2 * len(set(chains) & set(group)) > len(group):
                out.append((record, chain))
                break
    return out


def wait_for_admission(node: HivemindNode, run_id: str, nonce: bytes, timeout: float, poll_interval: float = 0.5,
                       trusted: Sequence[str] = (), allowed: Optional[Container[str]] = None) -> tuple[dict[str, Any], GroupChain]:
    """The admission record of this attempt (``nonce``) agreed by a strict majority of a group this joiner can trust
    (at the head of a chain from its anchor: a statement one of ``trusted`` signed, or the one genesis the running
    marks name), and that chain; :class:`Refused` if such a group refused this peer, :class:`UserError` if nothing was
    agreed within ``timeout`` seconds or the run id is claimed by two groups (``hivemind_chain.anchor_of``). With an
    allow-list (``allowed``: base58 peer ids), marks and records of anyone else are not read."""

    def only_allowed(entries: dict[PeerID, bytes]) -> dict[PeerID, bytes]:
        return entries if allowed is None else {w: v for w, v in entries.items() if w.to_base58() in allowed}

    key = admit_key(run_id, node.peer_id)
    deadline = time.monotonic() + timeout
    polls = 0
    found: list[tuple[dict[str, Any], GroupChain]] = []
    anchor: Optional[bytes] = None

    def agreed(entries: dict[PeerID, bytes]) -> bool:
        nonlocal polls, anchor
        if not trusted:
            anchor = anchor_of(only_allowed(node.get_owned(running_key(run_id))), run_id)
        for record, chain in (_agreed(only_allowed(entries), run_id, trusted, anchor) if trusted or anchor else ()):
            if "refused" in record:
                raise Refused(f"the members of run {run_id!r} refused this peer ({node.peer_id}): {record['refused']}",
                              str(record["refused"]))
            if record.get("nonce") == nonce:
                found.append((record, chain))
                return True
        polls += 1
        if polls % 10 == 0 and not run_is_running(node, run_id, allowed):
            raise UserError(f"run {run_id!r} ended before its members admitted this peer: start a new run (another run_id)")
        return False

    node.poll_owned(key, agreed, deadline, poll_interval, resolve=True)  # records with a long chain go by reference
    if not found:
        raise UserError(
            f"run {run_id!r} is marked as running, but its members did not admit this peer within {timeout:.0f}s. "
            "Members admit joiners every `join_every` steps; if the run has ended, start a new one with another "
            "run_id (or raise rendezvous_timeout). A joiner believes only a group whose chain of changes verifies "
            + ("from one of its trusted_peers." if trusted else "from the run's first group.")
        )
    return found[0]


def download_agreed_state(
    node: HivemindNode, sources: Sequence[PeerID], step: int, accept: Callable[[dict[str, Any]], bool], timeout: float,
    max_bytes: int = 2**34,
) -> tuple[dict[str, Any], PeerID]:
    """A checkpoint of ``step`` that ``accept`` (the digest check) takes, from the first of ``sources`` (in a random
    order, to spread the load) that offers one of at most ``max_bytes``; any failure (unreachable, no offer, too
    large, not a checkpoint, one ``accept`` cannot even read) moves on to the next; raises :class:`TransportError`
    when none does."""
    order = list(sources)
    random.shuffle(order)
    problems = []
    for peer in order:
        try:
            checkpoint = decode_record(download_state(node, peer, step, timeout, max_bytes=max_bytes), strict=True)
            agreed = isinstance(checkpoint, dict) and accept(checkpoint)
        except Exception as e:  # noqa: BLE001 - whatever a member sends: the next member
            problems.append(f"{peer}: {e!r}")
            continue
        if agreed:
            return checkpoint, peer
        problems.append(f"{peer}: its state does not have the digest the members agreed on")
    raise TransportError(f"no member sent the agreed state of step {step}:\n  " + "\n  ".join(problems))
