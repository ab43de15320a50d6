"""Inner-product manipulation: attackers send ``-epsilon`` times the mean of the honest gradients they know.

From Xie et al., 2020, "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product Manipulation".
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_btard.attacks.base import Attack, AttackContext, Byzantine

__all__ = ["InnerProductManipulation"]


class InnerProductManipulation(Attack):
    """Every attacker sends ``-epsilon * mean(g)``, ``g`` the colluders' own honest gradients, or with
    ``omniscient=True`` the honest peers' gradients of the step (the paper's attacker, who knows them).

    Args:
        epsilon: how far (relative to the mean) to push against the true gradient.
        omniscient: use the honest peers' gradients (``attacks/base.py``: how the simulation knows them).
    """

    colluding: ClassVar[bool] = True

    def __init__(
        self,
        byzantine: Byzantine,
        epsilon: float = 0.1,
        omniscient: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(byzantine, **kwargs)
        self.epsilon = float(epsilon)
        self.omniscient = bool(omniscient)

    def attack_gradient(self, gradient: Tensor, ctx: AttackContext) -> Tensor:
        peers = self.honest_gradients if self.omniscient else self.colluders_gradients
        assert peers is not None
        if peers.dtype.itemsize < 4:
            peers = peers.to(torch.float32)
        return peers.mean(0).mul_(-self.epsilon).to(gradient.dtype).view_as(gradient)
