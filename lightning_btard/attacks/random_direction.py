"""Constant random direction: every colluder sends the same seeded direction, scaled to its own norm.

From the released BTARD code (``ConstantDirection``): a direction fixed by a seed shared by all
attackers, scaled to 1000 times the attacker's honest gradient norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from torch import Tensor

from lightning_btard.attacks.base import Attack, AttackContext, honest_norm, seeded_direction

__all__ = ["RandomDirection"]


class RandomDirection(Attack):
    """Send ``scale * ||g|| * u``, where ``u`` is a unit direction derived from ``seed`` alone.

    Every attacker (sharing ``seed``) sends the same direction at every attack step, with the norm
    of its own honest gradient ``g`` times ``scale``. The released code drew and scaled the
    direction per parameter tensor; here it is one direction over the whole flat gradient, so only
    its overall norm (not each tensor's) is tied to the honest gradient. The direction is drawn
    once and cached (one extra flat-gradient-sized tensor on each attacker).

    Args:
        scale: multiple of the attacker's honest gradient norm (the released code's default is 1000).
    """

    def __init__(
        self,
        byzantine: Sequence[int],
        scale: float = 1000.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(byzantine, **kwargs)
        self.scale = float(scale)
        self._direction: Optional[Tensor] = None

    def attack_gradient(self, gradient: Tensor, ctx: AttackContext) -> Tensor:
        u = self._direction
        if u is None or u.numel() != gradient.numel() or u.dtype != gradient.dtype or u.device != gradient.device:
            u = self._direction = seeded_direction(gradient.numel(), self.seed, gradient)
        return u.view_as(gradient) * (honest_norm(gradient) * self.scale)
