"""False accusations: accuse an honest peer of sending a part that contradicts its commitment.

The accusation carries no valid signature of the accused, so every peer finds the evidence false and
bans the accuser.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_btard.attacks.base import AttackContext, ProtocolAttack
from lightning_btard.protocol.round import Behaviour

__all__ = ["FalseAccusation"]


class FalseAccusation(ProtocolAttack):
    """Peers among ``byzantine`` accuse member ``victim`` (an index in the round) with forged evidence."""

    def __init__(
        self,
        byzantine: Sequence[int],
        victim: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(byzantine, **kwargs)
        self.victim = int(victim)

    def conduct(self, ctx: AttackContext) -> Behaviour:
        victim = self.victim

        class Accuse(Behaviour):
            def __init__(self) -> None:
                self.done = False

            def accusations(self, step: int, honest: list[tuple]) -> list[tuple]:
                if self.done:
                    return honest
                self.done = True
                return honest + [("bad-part", victim, (torch.zeros(1), bytes(64)))]

        return Accuse()
