"""Coordinate-wise median (Yin et al., 2018): each coordinate's median over the peers."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from lightning_btard.aggregators.base import NO_STATS, AggregationResult, register_aggregator, used_rows
from lightning_btard.ops.median import coordinate_median


@register_aggregator("coordinate_median")
class CoordinateMedian:
    """``median_i x_i[c]`` for every coordinate ``c``; for an even number of rows the lower of the two middle values
    (``torch.median``'s convention). Separable: per part (the butterfly) it is the whole vector's rule."""

    options = ()

    def __call__(self, parts: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        return AggregationResult(coordinate_median(used_rows(parts, weights)), dict(NO_STATS))

    def __repr__(self) -> str:
        return "CoordinateMedian()"
