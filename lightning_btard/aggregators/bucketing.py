"""Bucketing (Karimireddy, He and Jaggi, ICLR 2022): average random buckets of ``bucket_size`` rows, then any rule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_btard.aggregators.base import AggregationResult, register_aggregator, used_rows
from lightning_btard.aggregators.wrappers import inner_rule
from lightning_btard.errors import UserError


@register_aggregator("bucketing")
class Bucketing:
    """Rows shuffled (a generator seeded with ``seed`` and the call's number), cut into ``ceil(k / s)`` buckets of
    ``s = bucket_size`` consecutive rows (the last may be smaller), each bucket averaged; ``inner`` (a registered
    rule, with ``inner_options``) aggregates the bucket means. Reports the inner rule's statistics."""

    options = ("bucket_size", "inner", "inner_options", "seed")

    def __init__(self, bucket_size: int = 2, inner: str = "centered_clip", inner_options: Optional[Mapping[str, Any]] = None,
                 seed: int = 0) -> None:
        if int(bucket_size) != bucket_size or bucket_size < 1:
            raise UserError(f"bucket_size must be a whole number >= 1, got {bucket_size}")
        self.bucket_size, self.inner_name, self.seed = int(bucket_size), inner, int(seed)
        self.inner = inner_rule(inner, inner_options, "bucketing")
        self.calls = 0

    def buckets(self, k: int) -> list[Tensor]:
        """This call's buckets: row indices (advances the call counter)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        return list(torch.randperm(k, generator=g).split(self.bucket_size))

    def __call__(self, parts: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        x = used_rows(parts, weights)
        means = torch.stack([x[idx.to(x.device)].to(torch.float64).mean(dim=0) for idx in self.buckets(x.shape[0])])
        return self.inner(means.to(x.dtype), None)

    def __repr__(self) -> str:
        return f"Bucketing(bucket_size={self.bucket_size}, inner={self.inner!r}, seed={self.seed})"
