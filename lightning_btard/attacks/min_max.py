"""MinMax and MinSum (Shejwalkar and Houmansadr, NDSS 2021, "Manipulating the Byzantine"): the honest mean pushed
along a perturbation as far as the honest gradients' own spread hides it.

Both send ``m = mu + gamma * p``, ``mu`` the honest peers' mean and ``p`` a perturbation (``"std"``: minus the
coordinate-wise standard deviation, ``"unit"``: minus the unit mean, ``"sign"``: minus its sign), with the largest
``gamma`` such that

- **MinMax**: ``max_i ||m - g_i|| <= max_{i,j} ||g_i - g_j||`` (``m`` is no farther from any honest gradient than the
  two farthest apart are from each other);
- **MinSum**: ``sum_i ||m - g_i||^2 <= max_i sum_j ||g_i - g_j||^2``.

The papers search ``gamma`` by halving; each constraint is a quadratic in ``gamma``, solved here exactly (the
largest root). Full knowledge (the honest gradients) is what the papers assume: these attacks are omniscient
(``attacks/base.py``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from lightning_btard.attacks.base import Attack, AttackContext, Byzantine

__all__ = ["MinMax", "MinSum", "max_gamma", "perturbation"]

Perturbation = Literal["std", "unit", "sign"]


def perturbation(honest: Tensor, kind: Perturbation) -> Tensor:
    """The direction ``p`` (float64) from the honest gradients ``[h, d]``."""
    mu = honest.mean(dim=0)
    if kind == "std":
        return -(honest.std(dim=0, correction=1 if honest.shape[0] > 1 else 0))
    if kind == "unit":
        return -mu / mu.norm().clamp_min(1e-30)
    if kind == "sign":
        return -torch.sign(mu)
    raise ValueError(f"perturbation must be 'std', 'unit' or 'sign', got {kind!r}")


def max_gamma(honest: Tensor, p: Tensor, rule: Literal["min_max", "min_sum"]) -> float:
    """The largest ``gamma >= 0`` with ``mu + gamma p`` within the rule's bound (module docstring), in float64."""
    g = honest.to(torch.float64)
    p = p.to(torch.float64)
    mu = g.mean(dim=0)
    c = float(p @ p)
    if c == 0.0:
        return 0.0
    delta = mu - g  # [h, d]: mu - g_i
    a = (delta * delta).sum(dim=1)  # ||mu - g_i||^2
    b = delta @ p  # <mu - g_i, p>
    d2 = torch.cdist(g, g).pow(2)
    if rule == "min_max":
        bound = float(d2.max())  # (max_{i,j} ||g_i - g_j||)^2
        # ||mu - g_i + gamma p||^2 = a_i + 2 gamma b_i + gamma^2 c <= bound for every i
        roots = (-b + torch.sqrt((b * b - c * (a - bound)).clamp_min(0.0))) / c
        return max(float(roots.min()), 0.0)
    if rule == "min_sum":
        h = g.shape[0]
        bound = float(d2.sum(dim=1).max())
        A, B, C = float(a.sum()), float(b.sum()), h * c  # sum_i: A + 2 gamma B + gamma^2 C <= bound
        return max((-B + max(B * B - C * (A - bound), 0.0) ** 0.5) / C, 0.0)
    raise ValueError(f"rule must be 'min_max' or 'min_sum', got {rule!r}")


class MinMax(Attack):
    """Every attacker sends ``mu + gamma p`` with MinMax's largest ``gamma`` (module docstring).

    Args:
        perturbation: ``"std"`` (the papers' strongest in most settings), ``"unit"`` or ``"sign"``.
    """

    rule: Literal["min_max", "min_sum"] = "min_max"

    def __init__(self, byzantine: Byzantine, perturbation: Perturbation = "std", **kwargs: Any) -> None:
        super().__init__(byzantine, **kwargs)
        if perturbation not in ("std", "unit", "sign"):
            raise ValueError(f"perturbation must be 'std', 'unit' or 'sign', got {perturbation!r}")
        self.perturbation = perturbation
        self.omniscient = True
        self.last_gamma = 0.0

    def attack_gradient(self, gradient: Tensor, ctx: AttackContext) -> Tensor:
        assert self.honest_gradients is not None
        honest = self.honest_gradients.to(torch.float64)
        p = perturbation(honest, self.perturbation)
        self.last_gamma = max_gamma(honest, p, self.rule)
        return (honest.mean(dim=0) + self.last_gamma * p).to(gradient.dtype).view_as(gradient)


class MinSum(MinMax):
    """Every attacker sends ``mu + gamma p`` with MinSum's largest ``gamma`` (module docstring)."""

    rule: Literal["min_max", "min_sum"] = "min_sum"
