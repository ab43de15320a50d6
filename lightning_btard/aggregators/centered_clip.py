"""CenteredClip as an aggregator (the math lives in :mod:`lightning_btard.ops.centered_clip`)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_btard.aggregators.base import AggregationResult, register_aggregator
from lightning_btard.errors import UserError
from lightning_btard.ops.centered_clip import centered_clip_with_stats
from lightning_btard.ops.workspace import Workspace


@register_aggregator("centered_clip")
class CenteredClip:
    """BTARD's robust aggregation of one part: the CenteredClip fixed point with radius ``tau``."""

    options = ("tau", "eps", "max_iters")

    def __init__(self, tau: float = 1.0, eps: float = 1e-6, max_iters: int = 500) -> None:
        if not tau > 0:
            raise UserError(f"tau must be positive (or inf), got {tau}")
        self.tau, self.eps, self.max_iters = float(tau), float(eps), int(max_iters)
        self._out = Workspace()  # the result is sent before the next call: reuse its memory

    def __call__(self, parts: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        dtype = torch.float32 if parts.dtype in (torch.float16, torch.bfloat16) else parts.dtype
        out = self._out.get("centered_clip", parts.shape[1:], dtype, parts.device)
        r = centered_clip_with_stats(parts, self.tau, weights, max_iters=self.max_iters, eps=self.eps, out=out)
        return AggregationResult(
            r.value, {"clipped": float(r.clipped), "iterations": float(r.iterations), "residual": r.residual}
        )

    def __repr__(self) -> str:
        return f"CenteredClip(tau={self.tau}, eps={self.eps}, max_iters={self.max_iters})"
