"""Geometric median by Weiszfeld's algorithm (as in RFA, Pillutla et al., 2022): ``argmin_z sum_i ||x_i - z||``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_btard.aggregators.base import AggregationResult, register_aggregator, used_rows
from lightning_btard.errors import UserError


@register_aggregator("geometric_median")
class GeometricMedian:
    """Weiszfeld's iteration ``z <- sum_i x_i / max(||x_i - z||, nu) / sum_i 1 / max(||x_i - z||, nu)`` from the mean,
    until a step moves ``z`` by at most ``tol * max(||z||, 1)`` or after ``max_iters`` steps. ``nu`` keeps a row that
    ``z`` reaches from dividing by zero (the smoothed Weiszfeld of RFA). Computed in float64. Not separable: per part
    (the butterfly) it is the geometric median of each part; ``topology="server"`` takes it of whole vectors."""

    options = ("tol", "max_iters", "nu")

    def __init__(self, tol: float = 1e-6, max_iters: int = 100, nu: float = 1e-8) -> None:
        if not (tol > 0 and nu > 0) or max_iters < 1:
            raise UserError(f"need tol > 0, nu > 0 and max_iters >= 1, got tol={tol}, nu={nu}, max_iters={max_iters}")
        self.tol, self.max_iters, self.nu = float(tol), int(max_iters), float(nu)

    def __call__(self, parts: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        x = used_rows(parts, weights).to(torch.float64)
        z = x.mean(dim=0)
        moved, it = float("inf"), 0
        while it < self.max_iters:
            it += 1
            inv = 1.0 / torch.linalg.vector_norm(x - z, dim=1).clamp_min(self.nu)
            new = (inv[:, None] * x).sum(dim=0) / inv.sum()
            moved = float(torch.linalg.vector_norm(new - z))
            z = new
            if moved <= self.tol * max(float(torch.linalg.vector_norm(z)), 1.0):
                break
        return AggregationResult(z.to(parts.dtype), {"clipped": 0.0, "iterations": float(it), "residual": moved})

    def __repr__(self) -> str:
        return f"GeometricMedian(tol={self.tol}, max_iters={self.max_iters}, nu={self.nu})"
