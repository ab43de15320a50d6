"""Wrong aggregate: as aggregator, publish and send a CenteredClip result off by ``scale`` (a protocol attack).

Caught by the CenteredClip check on secret random directions (``verify=True``): its part fails the
check and nobody it could blame lied, so every honest peer bans it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from torch import Tensor

from lightning_btard.attacks.base import Attack, AttackContext
from lightning_btard.protocol.round import Behaviour

__all__ = ["WrongAggregate"]


class _Scaled(Behaviour):
    def __init__(self, scale: float) -> None:
        self.scale = scale

    def published_aggregate(self, step: int, aggregate: Tensor) -> Tensor:
        return aggregate * self.scale


class WrongAggregate(Attack):
    """Aggregators among ``byzantine`` publish and send ``scale`` times their true aggregate."""

    def __init__(
        self,
        byzantine: Sequence[int],
        attack_start: int = 0,
        attack_every: int = 1,
        ban_prob: Optional[float] = None,
        seed: int = 0,
        scale: float = 1.01,
    ) -> None:
        super().__init__(byzantine, attack_start, attack_every, ban_prob, seed)
        self.scale = float(scale)

    def behaviour(self, ctx: AttackContext) -> Optional[Behaviour]:
        return _Scaled(self.scale) if self.is_attacking(ctx.step, ctx.rank) else None
