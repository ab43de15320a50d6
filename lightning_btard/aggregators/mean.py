"""Plain (weighted) averaging: the undefended baseline, what DDP computes."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_btard.aggregators.base import AggregationResult, register_aggregator


@register_aggregator("mean")
class Mean:
    """``sum_i w_i x_i / sum_i w_i``."""

    options = ()

    def __call__(self, parts: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        if weights is None:
            value = parts.mean(dim=0)
        else:
            w = weights.to(device=parts.device, dtype=parts.dtype)
            value = (w / w.sum()) @ parts
        return AggregationResult(value, {"clipped": 0.0, "iterations": 0.0, "residual": 0.0})

    def __repr__(self) -> str:
        return "Mean()"
