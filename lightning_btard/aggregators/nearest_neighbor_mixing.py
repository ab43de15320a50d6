"""Nearest-neighbour mixing (NNM; Allouah et al., AISTATS 2023): each row becomes the mean of its ``k - f`` nearest
rows (itself included), then any rule aggregates the mixed rows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_btard.aggregators.base import AggregationResult, register_aggregator, used_rows
from lightning_btard.aggregators.wrappers import inner_rule
from lightning_btard.errors import UserError


def mix(x: Tensor, f: int) -> Tensor:
    """``[k, d]`` -> ``[k, d]``: row ``i`` replaced by the mean of the ``k - f`` rows nearest to it (Euclidean, itself at
    distance 0 first; ties by index), in float64."""
    x64 = x.to(torch.float64)
    d = torch.cdist(x64, x64)
    d.fill_diagonal_(-1.0)  # itself first
    nearest = d.argsort(dim=1, stable=True)[:, : x.shape[0] - f]
    return x64[nearest].mean(dim=1)


@register_aggregator("nnm")
class NearestNeighborMixing:
    """NNM with ``f`` Byzantine rows assumed (default ``(k - 1) // 2``), then ``inner`` (a registered rule, with
    ``inner_options``). Reports the inner rule's statistics."""

    options = ("f", "inner", "inner_options")

    def __init__(self, f: Optional[int] = None, inner: str = "centered_clip", inner_options: Optional[Mapping[str, Any]] = None) -> None:
        if f is not None and f < 0:
            raise UserError(f"f must be >= 0, got {f}")
        self.f, self.inner_name = f, inner
        self.inner = inner_rule(inner, inner_options, "nnm")

    def __call__(self, parts: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        x = used_rows(parts, weights)
        k = x.shape[0]
        f = (k - 1) // 2 if self.f is None else min(self.f, k - 1)
        return self.inner(mix(x, f).to(x.dtype), None)

    def __repr__(self) -> str:
        return f"NearestNeighborMixing(f={self.f}, inner={self.inner!r})"
