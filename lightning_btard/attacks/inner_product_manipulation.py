"""Inner-product manipulation: colluders send ``-epsilon`` times the mean of their honest gradients.

From Xie et al., 2020, "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product Manipulation".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_btard.attacks.base import Attack, AttackContext

__all__ = ["InnerProductManipulation"]


class InnerProductManipulation(Attack):
    """Every attacker sends ``-epsilon * mean(colluders' honest gradients)``.

    Args:
        epsilon: how far (relative to the colluders' mean) to push against the true gradient.
    """

    colluding: ClassVar[bool] = True

    def __init__(
        self,
        byzantine: Sequence[int],
        epsilon: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(byzantine, **kwargs)
        self.epsilon = float(epsilon)

    def attack_gradient(self, gradient: Tensor, ctx: AttackContext) -> Tensor:
        peers = self.colluders_gradients
        if peers.dtype.itemsize < 4:
            peers = peers.to(torch.float32)
        return peers.mean(0).mul_(-self.epsilon).to(gradient.dtype).view_as(gradient)
