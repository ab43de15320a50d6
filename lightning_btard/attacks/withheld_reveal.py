"""Withheld MPRNG reveal: commit to a secret, then do not reveal it (to bias or stall the shared seed).

Caught at the reveal phase: a missing reveal is a missing public record; the round goes on without it.
"""

from __future__ import annotations

from typing import Optional

from lightning_btard.attacks.base import AttackContext, ProtocolAttack
from lightning_btard.protocol.round import Behaviour

__all__ = ["WithheldReveal"]


class WithheldReveal(ProtocolAttack):
    """Peers among ``byzantine`` never reveal their MPRNG secret."""


    def conduct(self, ctx: AttackContext) -> Behaviour:
        class Withhold(Behaviour):
            def reveal(self, step: int, secret: bytes) -> Optional[bytes]:
                return None

        return Withhold()
