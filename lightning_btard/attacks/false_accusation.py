"""False accusations: accuse an honest peer in the round, or as its validator.

``kind="round"``: accuse member ``victim`` of sending a part that contradicts its commitment; the
accusation carries no valid signature of the accused, so every peer finds the evidence false and bans
the accuser. ``kind="validation"``: when this peer is a validator, claim that its (honest) target's
gradient does not recompute; every peer recomputes it, finds it honest, and bans the accuser.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from lightning_btard.attacks.base import AttackContext, Byzantine, ProtocolAttack
from lightning_btard.protocol.round import Behaviour

__all__ = ["FalseAccusation"]


class FalseAccusation(ProtocolAttack):
    """Peers among ``byzantine`` accuse honest peers: member ``victim`` of the round with forged evidence
    (``kind="round"``), or their validation targets (``kind="validation"``)."""

    def __init__(
        self,
        byzantine: Byzantine,
        victim: int = 0,
        kind: Literal["round", "validation"] = "round",
        **kwargs: Any,
    ) -> None:
        super().__init__(byzantine, **kwargs)
        if kind not in ("round", "validation"):
            raise ValueError(f"kind must be 'round' or 'validation', got {kind!r}")
        self.victim = int(victim)
        self.kind = kind

    def conduct(self, ctx: AttackContext) -> Behaviour:
        victim = self.victim
        if self.kind == "validation":

            class AccuseTarget(Behaviour):
                def validation_claims(self, step: int, target: int, agrees: bool) -> list[int]:
                    return [target]

            return AccuseTarget()

        class Accuse(Behaviour):
            def __init__(self) -> None:
                self.done = False

            def accusations(self, step: int, honest: list[tuple]) -> list[tuple]:
                if self.done:
                    return honest
                self.done = True
                return honest + [("bad-part", victim, (torch.zeros(1), bytes(64)))]

        return Accuse()
