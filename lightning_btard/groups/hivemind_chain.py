"""The chain of group changes (hivemind backend): what a joining peer believes about who the run's members are.

Each time the group changes (a ban, a departure, a regroup, an admission), every member that stays signs a
*statement* of the new group (run id, run salt, members, session, and the digest of the statement before) with its
libp2p identity key, the RSA key its peer id is the hash of (:meth:`GroupChain.sign`), and stores that signature in
the DHT; the members collect each other's signatures there before an admission (:meth:`GroupChain.collect`). The
first statement, the *genesis*, is the rendezvous group; every one of its members signs it during the rendezvous.

A joiner believes a group only at the head of a chain that verifies (:func:`verify_chain`):

- the genesis names the run, has no predecessor, and is signed by each of its members;
- each next statement names the digest of the one before and is signed by a strict majority of the members of the
  one before (a Byzantine minority of a group cannot extend the chain; signatures of anyone else do not count);
- the chain starts at an **anchor** the joiner can check on its own: when the user configured ``trusted_peers``,
  some statement of the chain is signed by one of them; otherwise the genesis is the only one the run's members name
  in their running marks (:func:`anchor_of`; two named: the run id is squatted, an error that says what to do).

What is not Sybil-resistant, and why the anchor matters: fresh identities cost ~76 ms each, so anyone can make a
genesis of ``num_peers`` identities of its own for the same run id. Without ``trusted_peers`` a joiner refuses to
choose between two geneses (it stops with an error: a denial of service, never a wrong group); with them it takes
the chain its trusted peers signed.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from hivemind.utils.crypto import RSAPublicKey

from lightning_btard.errors import UserError
from lightning_btard.transports.codec import decode_record, encode_record
from lightning_btard.transports.hivemind_node import peer_id_of_owner

__all__ = ["GroupChain", "Link", "anchor_of", "chain_key", "statement_digest", "verify_chain"]

log = logging.getLogger(__name__)

_DOMAIN = b"lightning-btard group change v1|"
_TTL = 24 * 3600.0
MAX_LINKS = 4096
"""A chain longer than this is not read (a run changes its group at most a few times per ``join_every`` steps)."""


def chain_key(run_id: str, statement: bytes) -> str:
    """Where members store their signatures of the statement whose digest is ``statement``."""
    return f"btard/{run_id}/chain/{statement.hex()}"


def statement_digest(statement: dict[str, Any]) -> bytes:
    return hashlib.sha256(_DOMAIN + encode_record(statement)).digest()


def _signature_ok(owner: bytes, peer: str, signed: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``peer``'s of ``signed``: ``owner`` (an ``[owner:<ssh-rsa key>]`` marker) must be the
    key whose hash is ``peer``, and the signature must verify with it."""
    if type(owner) is not bytes or type(signature) is not bytes or type(peer) is not str or len(signature) > 4096:
        return False
    pid = peer_id_of_owner(owner)
    if pid is None or pid.to_base58() != peer:
        return False
    try:
        return RSAPublicKey.from_bytes(owner[len(b"[owner:") : -1]).verify(signed, signature)
    except Exception:  # noqa: BLE001 - an unreadable key or signature verifies nothing
        return False


@dataclass
class Link:
    statement: dict[str, Any]
    """``{"run", "salt", "prev", "members", "session"}``: the group after the change (members as base58 peer ids)."""
    signatures: dict[str, bytes] = field(default_factory=dict)
    """Base58 peer id → its RSA signature of the statement's digest (checked when added)."""

    @property
    def digest(self) -> bytes:
        return statement_digest(self.statement)

    @property
    def members(self) -> list[str]:
        return list(self.statement["members"])


@dataclass
class GroupChain:
    """One member's copy of the run's chain; ``owners`` holds the owner marker of every signer seen."""

    run_id: str
    salt: bytes
    links: list[Link] = field(default_factory=list)
    owners: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def genesis(cls, run_id: str, salt: bytes, members: Sequence[Any], session: bytes) -> "GroupChain":
        chain = cls(run_id, bytes(salt))
        chain.links.append(Link(chain._statement(b"", members, session)))
        return chain

    def _statement(self, prev: bytes, members: Sequence[Any], session: bytes) -> dict[str, Any]:
        return {"run": self.run_id, "salt": self.salt, "prev": bytes(prev),
                "members": [m if isinstance(m, str) else m.to_base58() for m in members], "session": bytes(session)}

    @property
    def head(self) -> Link:
        return self.links[-1]

    def extend(self, members: Sequence[Any], session: bytes) -> Link:
        """The statement of the group after a change (the same on every member that saw the same change)."""
        self.links.append(Link(self._statement(self.head.digest, members, session)))
        return self.head

    def sign(self, node: Any, index: int = -1) -> bytes:
        """This node's signature of link ``index``, kept in the chain."""
        link = self.links[index]
        signature = node.private_key.sign(link.digest)
        me = node.peer_id.to_base58()
        self.owners[me] = node.owner
        link.signatures[me] = signature
        return signature

    def add(self, index: int, peer: str, owner: bytes, signature: bytes) -> bool:
        """Add ``peer``'s signature of link ``index`` if it verifies and ``peer`` may sign it (a member of the group
        before, or of the genesis itself)."""
        link = self.links[index]
        signers = link.members if index == 0 else self.links[index - 1].members
        if peer not in signers or not _signature_ok(owner, peer, link.digest, signature):
            return False
        self.owners[peer] = owner
        link.signatures[peer] = signature
        return True

    def complete(self, index: int) -> bool:
        """Whether link ``index`` carries enough signatures (all of the genesis; a strict majority of the group before)."""
        link = self.links[index]
        if index == 0:
            return set(link.members) <= set(link.signatures)
        before = self.links[index - 1].members
        return 2 * len(set(before) & set(link.signatures)) > len(before)

    def publish(self, node: Any, index: int = -1, timeout: float = 10.0) -> None:
        """Store this node's signature of link ``index`` in the DHT (best effort: a member that failed can still be
        outnumbered by those that did not)."""
        link = self.links[index]
        me = node.peer_id.to_base58()
        if me not in link.signatures:
            self.sign(node, index)
        stored = node.store_until(chain_key(self.run_id, link.digest), link.signatures[me], _TTL, time.monotonic() + timeout)
        if not stored:
            log.warning("BTARD: could not store this peer's signature of the group change in the DHT")

    def collect(self, node: Any) -> bool:
        """Read the signatures missing from incomplete links from the DHT; whether every link is complete now."""
        for index, link in enumerate(self.links):
            if self.complete(index):
                continue
            for writer, (owner, signature) in node.get_signed(chain_key(self.run_id, link.digest)).items():
                if writer.to_base58() not in link.signatures:
                    self.add(index, writer.to_base58(), owner, signature)
        return all(self.complete(i) for i in range(len(self.links)))

    def to_record(self) -> dict[str, Any]:
        """The chain as plain data (what an admission record carries)."""
        return {"links": [[link.statement, link.signatures] for link in self.links], "owners": dict(self.owners)}


def verify_chain(record: Any, run_id: str, trusted: Iterable[str] = (), genesis: Optional[bytes] = None) -> GroupChain:
    """The chain in ``record`` (``GroupChain.to_record``) if it verifies (see the module doc), with only the signatures
    that count kept; raises ``ValueError`` saying why not. ``trusted``: base58 peer ids, one of which must have signed
    some statement; ``genesis``: the digest the genesis must have (the anchor when nobody is trusted)."""
    if not isinstance(record, dict) or not isinstance(record.get("links"), list) or not isinstance(record.get("owners"), dict):
        raise ValueError("not a chain")
    raw_links, owners = record["links"], record["owners"]
    if not raw_links or len(raw_links) > MAX_LINKS:
        raise ValueError(f"a chain of {len(raw_links)} links")
    chain: Optional[GroupChain] = None
    for index, raw in enumerate(raw_links):
        if not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], dict) and isinstance(raw[1], dict)):
            raise ValueError(f"link {index} is malformed")
        statement, signatures = raw
        if set(statement) != {"run", "salt", "prev", "members", "session"} or statement["run"] != run_id \
                or type(statement["salt"]) is not bytes or type(statement["prev"]) is not bytes \
                or type(statement["session"]) is not bytes or not isinstance(statement["members"], list) \
                or not statement["members"] or not all(type(m) is str for m in statement["members"]) \
                or len(set(statement["members"])) != len(statement["members"]):
            raise ValueError(f"link {index}'s statement is malformed")
        if chain is None:
            if statement["prev"] != b"":
                raise ValueError("the chain does not start with a genesis")
            chain = GroupChain(run_id, statement["salt"])
        elif statement["prev"] != chain.head.digest or statement["salt"] != chain.salt:
            raise ValueError(f"link {index} does not follow the one before")
        chain.links.append(Link(statement))
        for peer, signature in signatures.items():
            if type(peer) is str:
                chain.add(index, peer, owners.get(peer), signature)  # type: ignore[arg-type]
        if not chain.complete(index):
            who = "every member" if index == 0 else "a strict majority of the group before"
            raise ValueError(f"link {index} is not signed by {who}")
    assert chain is not None
    trusted = set(trusted)
    if trusted:
        if not any(trusted & set(link.signatures) for link in chain.links):
            raise ValueError("no statement of the chain is signed by a trusted peer")
    elif genesis is None or chain.links[0].digest != genesis:
        raise ValueError("the chain starts from another genesis than the one the run's members name")
    return chain


def anchor_of(marks: dict[Any, bytes], run_id: str) -> Optional[bytes]:
    """The one genesis digest the run's running marks name (``None``: none yet); :class:`UserError` when they name two
    (someone runs a group of its own under this run id)."""
    named = set()
    for raw in marks.values():
        mark = decode_record(raw)
        if isinstance(mark, dict) and type(mark.get("genesis")) is bytes and len(mark["genesis"]) == 32:
            named.add(mark["genesis"])
    if len(named) > 1:
        raise UserError(
            f"run {run_id!r} is claimed by {len(named)} groups (its run id is squatted, or reused by another run): "
            "a joiner cannot tell which is genuine. Give the strategy trusted_peers (peer ids or multiaddresses of "
            "members you trust, e.g. your initial_peers) to join the one they sign, or use another run_id."
        )
    return next(iter(named), None)
