"""Equivocating aggregate: publish the true aggregate's hash but send some peers a shifted copy.

Caught at the gather phase: the receiver holds the aggregator's signature over a copy whose hash is
not the published one, two signed statements that contradict each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from lightning_btard.attacks.base import AttackContext, Byzantine, ProtocolAttack
from lightning_btard.protocol.round import Behaviour

__all__ = ["EquivocatingAggregate"]


class EquivocatingAggregate(ProtocolAttack):
    """Aggregators among ``byzantine`` send ``aggregate + shift`` to the peers in ``victims`` (default: peer 0)."""

    def __init__(
        self,
        byzantine: Byzantine,
        victims: Sequence[int] = (0,),
        shift: float = 0.01,
        **kwargs: Any,
    ) -> None:
        super().__init__(byzantine, **kwargs)
        self.victims, self.shift = set(int(v) for v in victims), float(shift)

    def conduct(self, ctx: AttackContext) -> Behaviour:
        victims, shift = self.victims, self.shift

        class Equivocate(Behaviour):
            def aggregate(self, step: int, receiver: int, aggregate: Tensor) -> Tensor:
                return aggregate + shift if receiver in victims else aggregate

        return Equivocate()
