"""Every DHT key and session name of the hivemind backend, in one place.

A *session* names one group instance: every member derives the same 16 bytes from the same public parts (run id,
members, generation, attempt), so messages and board records of different groups or rounds never mix. Keys are
strings under ``btard/``; each peer writes only its own owner-signed subkey under a key
(:meth:`~lightning_btard.transports.hivemind_node.HivemindNode.store`).
"""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["admit_key", "board_key", "join_key", "regroup_key", "rendezvous_key", "running_key", "session_of"]


def _text(part: Any) -> str:
    if isinstance(part, bytes):
        return part.hex()
    to_base58 = getattr(part, "to_base58", None)  # a libp2p PeerID
    return to_base58() if callable(to_base58) else str(part)


def session_of(*parts: Any) -> bytes:
    """The session every member derives from the same ``parts`` (strings, numbers, bytes, peer ids)."""
    return hashlib.sha256("|".join(_text(p) for p in parts).encode()).digest()[:16]


def rendezvous_key(run_id: str) -> str:
    """Where the peers of a new run announce themselves."""
    return f"btard/{run_id}/rendezvous"


def running_key(run_id: str) -> str:
    """Where members mark the run as running (or finished): peers that start later ask to join."""
    return f"btard/{run_id}/running"


def join_key(run_id: str) -> str:
    """Where peers ask to join a running run."""
    return f"btard/{run_id}/join"


def admit_key(run_id: str, peer: Any) -> str:
    """Where the members write their admission (or refusal) of ``peer``."""
    return f"btard/{run_id}/admit/{_text(peer)}"


def board_key(session: bytes, seq: int) -> str:
    """A group's public board record number ``seq``."""
    return f"btard/{session.hex()}/{seq}"


def regroup_key(session: bytes, attempt: int) -> str:
    """Where the survivors of a failed group announce themselves."""
    return f"btard/{session.hex()}/regroup/{attempt}"
