"""Wrong aggregate: as aggregator, publish and send a CenteredClip result off by ``scale``.

Caught by the CenteredClip check on secret random directions: its part fails the check and nobody
it could blame lied, so every honest peer bans it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_btard.attacks.base import AttackContext, Byzantine, ProtocolAttack
from lightning_btard.protocol.round import Behaviour

__all__ = ["WrongAggregate"]


class WrongAggregate(ProtocolAttack):
    """Aggregators among ``byzantine`` publish and send ``scale`` times their true aggregate."""

    def __init__(
        self,
        byzantine: Byzantine,
        scale: float = 1.01,
        **kwargs: Any,
    ) -> None:
        super().__init__(byzantine, **kwargs)
        self.scale = float(scale)

    def conduct(self, ctx: AttackContext) -> Behaviour:
        scale = self.scale

        class Scaled(Behaviour):
            def published_aggregate(self, step: int, aggregate: Tensor) -> Tensor:
                return aggregate * scale

        return Scaled()
