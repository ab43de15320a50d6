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

    options = ("tau", "eps", "rel_eps", "max_iters", "certify")

    def __init__(self, tau: float = 1.0, eps: float = 0.0, max_iters: int = 500, rel_eps: float = 5e-7,
                 certify: bool = True) -> None:
        """``eps``: absolute residual target; ``rel_eps``: relative to ``||v||``. The solver stops at the larger of
        the two; the verified round uses the same targets (and its check allows for them). ``certify=False`` skips
        measuring the residual on the full vectors where the rows' Gram matrix already gives the fixed point
        (:func:`~lightning_btard.ops.centered_clip.centered_clip_with_stats`): what ``BTARDStrategy`` uses when nobody
        checks the aggregates (``verify=False``); a verified round needs it certified."""
        if not tau > 0:
            raise UserError(f"tau must be positive (or inf), got {tau}")
        if not (eps >= 0 and rel_eps >= 0 and (eps > 0 or rel_eps > 0)):
            raise UserError(f"eps and rel_eps must be >= 0 and not both 0, got eps={eps}, rel_eps={rel_eps}")
        if max_iters < 1:
            raise UserError(f"max_iters must be >= 1, got {max_iters}")
        self.tau, self.eps, self.rel_eps, self.max_iters = float(tau), float(eps), float(rel_eps), int(max_iters)
        self.certify = bool(certify)
        self._out = Workspace()  # the result is sent before the next call: reuse its memory

    def __call__(self, parts: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        dtype = torch.float32 if parts.dtype in (torch.float16, torch.bfloat16) else parts.dtype
        out = self._out.get("centered_clip", parts.shape[1:], dtype, parts.device)
        r = centered_clip_with_stats(parts, self.tau, weights, max_iters=self.max_iters, eps=self.eps,
                                     rel_eps=self.rel_eps, out=out, certify=self.certify)
        return AggregationResult(
            r.value, {"clipped": float(r.clipped), "iterations": float(r.iterations), "residual": r.residual}
        )

    def __repr__(self) -> str:
        certify = "" if self.certify else ", certify=False"
        return f"CenteredClip(tau={self.tau}, eps={self.eps}, rel_eps={self.rel_eps}, max_iters={self.max_iters}{certify})"
