"""Coordinate-wise trimmed mean (Yin et al., 2018): per coordinate, drop the ``trim`` largest and smallest values."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from lightning_btard.aggregators.base import AggregationResult, register_aggregator, used_rows
from lightning_btard.errors import UserError


@register_aggregator("trimmed_mean")
class TrimmedMean:
    """``mean(sorted_i x_i[c] for the middle k - 2b)`` with ``b = trim``; with fewer than ``2b + 1`` rows (after bans)
    ``b`` shrinks to ``(k - 1) // 2`` (the median's neighbourhood) and the ``clipped`` statistic says how many values
    per coordinate were dropped."""

    options = ("trim",)

    def __init__(self, trim: int = 1) -> None:
        if int(trim) != trim or trim < 0:
            raise UserError(f"trim must be a whole number >= 0, got {trim}")
        self.trim = int(trim)

    def __call__(self, parts: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        rows = used_rows(parts, weights)
        k = rows.shape[0]
        b = min(self.trim, (k - 1) // 2)
        kept = rows.sort(dim=0).values[b:k - b] if b else rows
        value = kept.to(dtype=parts.dtype).mean(dim=0)
        return AggregationResult(value, {"clipped": float(2 * b), "iterations": 0.0, "residual": 0.0})

    def __repr__(self) -> str:
        return f"TrimmedMean(trim={self.trim})"
