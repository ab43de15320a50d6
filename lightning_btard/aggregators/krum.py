"""Krum and Multi-Krum (Blanchard et al., 2017): the rows closest to their nearest neighbours."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_btard.aggregators.base import AggregationResult, register_aggregator, used_rows
from lightning_btard.errors import UserError


def krum_scores(x: Tensor, f: int) -> Tensor:
    """Each row's score: the sum of its squared distances to its ``k - f - 2`` nearest other rows (float64)."""
    k = x.shape[0]
    x = x.to(torch.float64)
    d2 = torch.cdist(x, x).pow(2)
    d2.fill_diagonal_(float("inf"))
    nearest = max(k - f - 2, 1)
    return d2.topk(min(nearest, k - 1), dim=1, largest=False).values.sum(dim=1)


@register_aggregator("multi_krum")
class MultiKrum:
    """The mean of the ``m`` rows of lowest Krum score, ``f`` the number of Byzantine rows assumed (default
    ``(k - 3) // 2``, the most Krum tolerates: it needs ``k > 2f + 2``) and ``m`` default ``k - f``.
    ``clipped`` counts the rows left out."""

    options: tuple[str, ...] = ("f", "m")
    name = "multi_krum"

    def __init__(self, f: Optional[int] = None, m: Optional[int] = None) -> None:
        if (f is not None and f < 0) or (m is not None and m < 1):
            raise UserError(f"need f >= 0 and m >= 1, got f={f}, m={m}")
        self.f, self.m = f, m

    def _fm(self, k: int) -> tuple[int, int]:
        f = max((k - 3) // 2, 0) if self.f is None else min(self.f, max((k - 3) // 2, 0))
        m = (k - f) if self.m is None else self.m
        return f, max(1, min(m, k))

    def __call__(self, parts: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        x = used_rows(parts, weights)
        k = x.shape[0]
        f, m = self._fm(k)
        chosen = krum_scores(x, f).argsort()[:m] if k > 1 else torch.zeros(1, dtype=torch.long)
        value = x[chosen].to(torch.float64).mean(dim=0).to(parts.dtype)
        return AggregationResult(value, {"clipped": float(k - m), "iterations": 0.0, "residual": 0.0})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(f={self.f}, m={self.m})"


@register_aggregator("krum")
class Krum(MultiKrum):
    """The one row of lowest Krum score (Multi-Krum with ``m = 1``)."""

    options = ("f",)

    def __init__(self, f: Optional[int] = None) -> None:
        super().__init__(f=f, m=1)
