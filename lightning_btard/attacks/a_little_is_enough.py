"""A little is enough: colluders send ``mu - z * sigma`` of their honest gradients, coordinate-wise.

From Baruch et al., 2019, "A Little Is Enough: Circumventing Defenses For Distributed Learning".
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from lightning_btard.attacks.base import Attack, AttackContext, Byzantine

__all__ = ["ALittleIsEnough", "alie_z_max"]


def alie_z_max(n: int, f: int) -> float:
    """The paper's ``z_max`` for ``n`` peers of which ``f`` are Byzantine.

    ``s = floor(n/2 + 1) - f`` honest peers must be won over; ``z_max = Phi^{-1}((n - s) / n)``.
    """
    s = math.floor(n / 2 + 1) - f
    if not 0 < s < n:
        raise ValueError(
            f"ALittleIsEnough's z_max is undefined for n={n} peers with f={f} Byzantine "
            f"(needs 0 < floor(n/2 + 1) - f < n): pass z explicitly"
        )
    return NormalDist().inv_cdf((n - s) / n)


class ALittleIsEnough(Attack):
    """Every attacker sends ``mu - z * sigma``: the coordinate-wise mean and standard deviation of the colluders'
    honest gradients, or with ``omniscient=True`` of the honest peers' gradients of the step (the paper's setting).

    ``sigma`` is the unbiased (Bessel-corrected) standard deviation over the colluders, as in the
    paper's code; with a single colluder it is 0. With ``z=None`` the paper's ``z_max`` is
    recomputed at every attack from the peers taking part and the number of colluders.

    Args:
        z: how many standard deviations to shift by (``None``: the paper's ``z_max``).
        omniscient: use the honest peers' gradients (``attacks/base.py``: how the simulation knows them).
    """

    colluding: ClassVar[bool] = True

    def __init__(
        self,
        byzantine: Byzantine,
        z: Optional[float] = None,
        omniscient: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(byzantine, **kwargs)
        self.z = None if z is None else float(z)
        self.omniscient = bool(omniscient)

    def attack_gradient(self, gradient: Tensor, ctx: AttackContext) -> Tensor:
        peers = self.honest_gradients if self.omniscient else self.colluders_gradients
        assert peers is not None and self.colluders_gradients is not None
        if peers.dtype.itemsize < 4:
            peers = peers.to(torch.float32)
        k = peers.shape[0]
        f = self.colluders_gradients.shape[0]  # the attackers taking part
        z = self.z if self.z is not None else alie_z_max(ctx.world_size, f)
        sigma, mu = torch.std_mean(peers, dim=0, correction=1 if k > 1 else 0)
        return mu.sub_(sigma, alpha=z).to(gradient.dtype).view_as(gradient)
