"""Mimic (Karimireddy, He and Jaggi, ICLR 2022, "Byzantine-robust learning on heterogeneous datasets via
bucketing"): every attacker sends a copy of one honest peer's gradient, the one that stands out most along the
honest gradients' direction of largest spread, so that the defence over-weights that peer's data.

The paper estimates the direction ``z`` online during a warm-up and then keeps the chosen peer; here ``z`` (the top
principal direction of the honest gradients, from their ``[h, h]`` Gram matrix) and the peer
``i* = argmax_i <g_i - mu, z>`` are taken during the first ``warmup`` attacked steps, and ``i*`` is kept after that
(``warmup=0``: chosen afresh at every step). Omniscient (``attacks/base.py``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from lightning_btard.attacks.base import Attack, AttackContext, Byzantine

__all__ = ["Mimic", "mimic_target"]


def mimic_target(honest: Tensor) -> int:
    """The row ``argmax_i <g_i - mu, z>``, ``z`` the top principal direction of the rows (sign fixed so that the
    farthest row along it is positive)."""
    g = honest.to(torch.float64)
    centered = g - g.mean(dim=0)
    if g.shape[0] < 2 or float(centered.abs().max()) == 0.0:
        return 0
    gram = centered @ centered.T  # [h, h]: the same top direction as the [d, d] covariance, cheaply
    _, vectors = torch.linalg.eigh(gram)
    z = centered.T @ vectors[:, -1]
    scores = centered @ z
    if float(scores.max()) < -float(scores.min()):
        scores = -scores
    return int(scores.argmax())


class Mimic(Attack):
    """Every attacker sends the gradient of the honest peer :func:`mimic_target` picks.

    Args:
        warmup: attacked steps during which the target is chosen afresh; after them it is kept (0: always afresh).
    """

    def __init__(self, byzantine: Byzantine, warmup: int = 0, **kwargs: Any) -> None:
        super().__init__(byzantine, **kwargs)
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.warmup = int(warmup)
        self.omniscient = True
        self.target: Optional[int] = None
        """The mimicked peer, as an index into the step's honest peers."""
        self._chosen = 0

    def attack_gradient(self, gradient: Tensor, ctx: AttackContext) -> Tensor:
        assert self.honest_gradients is not None
        honest = self.honest_gradients
        if self.target is None or self.warmup == 0 or self._chosen < self.warmup or self.target >= honest.shape[0]:
            self.target = mimic_target(honest)
            self._chosen += 1
        return honest[self.target].to(gradient.dtype).view_as(gradient).clone()
