"""Sign flipping: the attacker sends its honest gradient times a large negative ``scale``.

From the released BTARD code (``SignFlipper``, which multiplied the gradient by -1000).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_btard.attacks.base import Attack, AttackContext, Byzantine

__all__ = ["SignFlipping"]


class SignFlipping(Attack):
    """Send ``scale * g`` instead of the honest gradient ``g``.

    Args:
        scale: factor applied to the honest gradient (the released code's default is -1000).
    """

    def __init__(
        self,
        byzantine: Byzantine,
        scale: float = -1000.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(byzantine, **kwargs)
        self.scale = float(scale)

    def attack_gradient(self, gradient: Tensor, ctx: AttackContext) -> Tensor:
        return gradient * self.scale
