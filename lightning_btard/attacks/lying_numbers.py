"""Lying verification numbers: publish projections that are not those of the part actually sent.

Caught by the aggregators, who hold the signed parts and recompute the numbers; the evidence (the
signed part) lets every peer recompute them too.
"""

from __future__ import annotations

from typing import Any

from lightning_btard.attacks.base import AttackContext, Byzantine, ProtocolAttack
from lightning_btard.protocol.round import Behaviour

__all__ = ["LyingNumbers"]


class LyingNumbers(ProtocolAttack):
    """Peers among ``byzantine`` publish ``factor`` times their true projections ``s``."""

    def __init__(
        self,
        byzantine: Byzantine,
        factor: float = 2.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(byzantine, **kwargs)
        self.factor = float(factor)

    def conduct(self, ctx: AttackContext) -> Behaviour:
        factor = self.factor

        class Lying(Behaviour):
            def numbers(self, step: int, part: int, s: list[float], norm: float, p: list[float]) -> tuple[list[float], float, list[float]]:
                return [factor * x for x in s], norm, p

        return Lying()
