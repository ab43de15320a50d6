"""Plain (weighted) averaging: the undefended baseline, what DDP computes."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_btard.aggregators.base import AggregationResult, register_aggregator
from lightning_btard.ops.workspace import Workspace


@register_aggregator("mean")
class Mean:
    """``sum_i w_i x_i / sum_i w_i``."""

    options = ()

    def __init__(self) -> None:
        self._out = Workspace()  # the result is consumed (sent) before the next call: reuse its memory

    def __call__(self, parts: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        out = self._out.get("mean", parts.shape[1:], parts.dtype, parts.device)
        n = parts.shape[0]
        w = torch.ones(n, dtype=parts.dtype, device=parts.device) if weights is None else weights.to(parts.device, parts.dtype)
        value = torch.mv(parts.T, w / w.sum(), out=out)  # a gemv: faster on a CPU than mean(dim=0)
        return AggregationResult(value, {"clipped": 0.0, "iterations": 0.0, "residual": 0.0})

    def __repr__(self) -> str:
        return "Mean()"
