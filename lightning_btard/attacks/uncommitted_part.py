"""Parts that do not match their commitments: commit to the honest gradient, send aggregators something else.

Caught at the scatter phase: the aggregator holds the sender's signature over a part whose hash is
not the committed one.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_btard.attacks.base import AttackContext, Byzantine, ProtocolAttack
from lightning_btard.protocol.round import Behaviour

__all__ = ["UncommittedPart"]


class UncommittedPart(ProtocolAttack):
    """Peers among ``byzantine`` send ``part + shift`` instead of the part they committed to."""

    def __init__(
        self,
        byzantine: Byzantine,
        shift: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(byzantine, **kwargs)
        self.shift = float(shift)

    def conduct(self, ctx: AttackContext) -> Behaviour:
        shift = self.shift

        class Uncommitted(Behaviour):
            def part(self, step: int, receiver: int, part: Tensor) -> Tensor:
                return part + shift

        return Uncommitted()
