"""The multi-party random number generator: commit, then reveal, then hash all reveals.

Each peer commits to ``digest(r_i, peer, step)`` for a fresh secret ``r_i`` before any gradient or
aggregate of the step is public, and reveals ``r_i`` only after every commitment is in. The shared
seed ``digest(step, r_1, ..., r_n)`` is unknown to everybody, colluders included, until the last
reveal; a peer that withholds its reveal (or reveals something that does not match) is banned and
the seed is derived from the remaining reveals.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from lightning_btard.protocol.agreement import strict_majority
from lightning_btard.protocol.digest import digest

if TYPE_CHECKING:
    from lightning_btard.transports.base import Transport

__all__ = ["MPRNGSecret", "agree_run_seed", "check_reveal", "draw", "shared_seed"]


@dataclass(frozen=True)
class MPRNGSecret:
    """A peer's secret for one step and the commitment it publishes first."""

    peer: int
    step: int
    secret: bytes

    @classmethod
    def fresh(cls, peer: int, step: int) -> "MPRNGSecret":
        return cls(peer, step, os.urandom(32))

    @property
    def commitment(self) -> bytes:
        return digest(self.secret, self.peer, self.step)


def check_reveal(commitment: bytes, reveal: object, peer: int, step: int) -> bool:
    """Whether ``reveal`` is the secret behind ``commitment`` for ``peer`` at ``step``."""
    return isinstance(reveal, bytes) and len(reveal) == 32 and digest(reveal, peer, step) == commitment


def shared_seed(step: int, reveals: Mapping[int, bytes]) -> bytes:
    """The step's shared seed from the valid reveals, in peer order."""
    items: list = [step]
    for peer in sorted(reveals):
        items += [peer, reveals[peer]]
    return digest(*items)


def draw(transport: "Transport", purpose: str) -> bytes:
    """32 bytes no member chooses: every member commits to a fresh secret (one board round), then reveals it (another);
    the digest of the reveals that match their commitments. A member can only choose between revealing and not (one
    bit of influence), never the value."""
    secret = os.urandom(32)
    commits = transport.all_gather_object(digest(secret, purpose))
    reveals = transport.all_gather_object(secret)
    valid = [r for c, r in zip(commits, reveals) if type(r) is bytes and len(r) == 32 and digest(r, purpose) == c]
    return digest(purpose, *valid)


def agree_run_seed(transport: "Transport", configured: Optional[str]) -> int:
    """The run's seed, chosen by no single member: the seed a strict majority of members configured (``seed_everything``
    on every peer: runs stay reproducible), else a commit-reveal draw over all members (one board round to commit a
    fresh secret, one to reveal it; reveals that do not match their commitment are left out)."""
    def seed_text(x: object) -> Optional[str]:  # a non-negative int64 in decimal, else no seed
        return x if type(x) is str and x.isdigit() and len(x) <= 18 else None

    secret = os.urandom(32)
    board = transport.all_gather_object([seed_text(configured), digest(secret, "run-seed")])
    seeds = [seed_text(e[0]) if type(e) is list and len(e) == 2 else None for e in board]
    top = strict_majority(seeds)
    if top is not None:
        return int(top)
    reveals = transport.all_gather_object(secret)
    valid = [r for e, r in zip(board, reveals) if type(e) is list and len(e) == 2 and type(r) is bytes and len(r) == 32
             and digest(r, "run-seed") == e[1]]
    return int.from_bytes(digest("run-seed", *valid)[:8], "little") >> 1
