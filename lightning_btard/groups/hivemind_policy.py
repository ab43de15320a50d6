"""Who may join a hivemind run, and how fast (``BTARDStrategy(allowed_peers=..., max_joins_per_step=..., ...)``).

**Permissioned runs** give an allow-list: peer ids (base58), from a file (one per line, ``#`` comments) or a list.
A line may name an owner after the peer id (``<peer id> <owner>``): peers of one owner are *tied*, and a ban of one
refuses them all. Only allowed peers count at the rendezvous, in the running marks a joiner reads, and among join
requests; nobody else can claim the run id, flood its members with requests, or join under a fresh identity.

**Open runs** (no allow-list) cap admissions instead: at most ``max_joins_per_step`` peers per admission (default 1)
and ``max_joins_per_window`` (default 4) per ``join_window`` steps (default 1000). Requests beyond a cap wait for a
later admission, in an order nobody can choose (a digest of the run salt, the step and the peer id), and members
list at most :data:`MAX_LISTED` requests each time, so a flood of requests costs them one DHT read of the requests
and a collective of bounded size.

What this is and is not: an open run is **not Sybil-resistant**. A fresh identity costs ~76 ms; a banned peer comes
back under a new one (its key and its tied peers are refused, nothing else ties two identities). The caps bound how
fast identities can arrive — a group of ``n`` honest members needs more than ``n`` Byzantine admissions to lose its
majority, which takes at least ``n / max_joins_per_window`` windows — and BTARD's checks ban each identity that
deviates (at its cost of recomputation), but a patient attacker with many identities that behave until they are the
majority can take an open run over. Runs that must resist that need an allow-list (or an admission ceremony outside
lightning-btard that writes one).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from lightning_btard.errors import UserError

__all__ = ["MAX_LISTED", "AdmissionPolicy", "peer_id_text", "read_allow_list"]

MAX_LISTED = 64
"""The most join requests a member lists in one admission (the first in the unpredictable order)."""


def peer_id_text(text: str, where: str) -> str:
    """A base58 peer id from a peer id or a multiaddress ending in ``/p2p/<peer id>`` (:class:`UserError` naming
    ``where`` otherwise)."""
    from hivemind.p2p import PeerID

    try:
        return PeerID.from_base58(text.rsplit("/p2p/", 1)[-1]).to_base58()
    except Exception as e:  # noqa: BLE001 - whatever the user wrote
        raise UserError(f"{where}: {text!r} is not a peer id (base58) or a multiaddress ending in /p2p/<peer id>") from e


def read_allow_list(source: Union[str, Sequence[str], None]) -> Optional[dict[str, str]]:
    """Peer id → owner from a file path or a list of ``"<peer id> [owner]"`` entries (``None``: an open run)."""
    if source is None:
        return None
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise UserError(f"allowed_peers: no file {str(path)!r} (give a file of peer ids, one per line, or a list)")
        entries, where = path.read_text().splitlines(), str(path)
    else:
        entries, where = list(source), "allowed_peers"
    out: dict[str, str] = {}
    for line in entries:
        words = str(line).split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2:
            raise UserError(f"{where}: {line!r}: expected '<peer id> [owner]'")
        peer = peer_id_text(words[0], where)
        out[peer] = words[1] if len(words) == 2 else peer
    if not out:
        raise UserError(f"{where}: the allow-list is empty (leave allowed_peers unset for an open run)")
    return out


def order_key(salt: bytes, step: int, peer: str) -> bytes:
    """The order in which requests are considered at ``step``: nobody can grind a place in it before the run exists."""
    return hashlib.sha256(b"btard-join|" + bytes(salt) + int(step).to_bytes(8, "little") + peer.encode()).digest()


@dataclass
class AdmissionPolicy:
    allowed: Optional[dict[str, str]] = None
    """Peer id → owner (permissioned run), or ``None`` (open run)."""
    max_joins_per_step: int = 1
    max_joins_per_window: int = 4
    join_window: int = 1000
    joins: list[int] = field(default_factory=list)
    """The steps of past admissions, one entry per admitted peer (the same on every member; joiners get it too)."""

    def __post_init__(self) -> None:
        for name in ("max_joins_per_step", "max_joins_per_window", "join_window"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")

    def allows(self, peer: str) -> bool:
        return self.allowed is None or peer in self.allowed

    def tied(self, peers: Iterable[str]) -> set[str]:
        """``peers`` and every peer the allow-list gives the same owner (what a ban refuses)."""
        peers = set(peers)
        if self.allowed is None:
            return peers
        owners = {self.allowed[p] for p in peers if p in self.allowed}
        return peers | {p for p, owner in self.allowed.items() if owner in owners}

    def room(self, step: int) -> int:
        """How many peers may be admitted at ``step``."""
        recent = sum(1 for s in self.joins if step - self.join_window < s <= step)
        return max(0, min(self.max_joins_per_step, self.max_joins_per_window - recent))

    def listed(self, requests: Sequence[Any], salt: bytes, step: int) -> list[Any]:
        """The requests a member lists at ``step``: allowed ones, the first :data:`MAX_LISTED` in the order of
        :func:`order_key` (``request.peer`` a libp2p peer id)."""
        allowed = [r for r in requests if self.allows(r.peer.to_base58())]
        return sorted(allowed, key=lambda r: order_key(salt, step, r.peer.to_base58()))[:MAX_LISTED]

    def choose(self, agreed: Sequence[Any], salt: bytes, step: int) -> list[Any]:
        """Of the requests a majority listed, those admitted now (the rest wait). Changes nothing: the members
        :meth:`record` the admission once it happened."""
        return sorted(agreed, key=lambda r: order_key(salt, step, r.peer.to_base58()))[: self.room(step)]

    def record(self, step: int, count: int) -> None:
        self.joins += [int(step)] * int(count)
