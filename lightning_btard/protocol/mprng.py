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

from lightning_btard.protocol.digest import digest

__all__ = ["MPRNGSecret", "check_reveal", "shared_seed"]


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
