"""Reductions of one small value per peer that a Byzantine minority cannot steer (Lightning's ``sync_dist`` logging,
``reduce_boolean_decision``): the median instead of the mean, order statistics inside the honest range instead of
the extremes, the majority instead of "all" or "any"."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["majority", "robust_reduce"]


def robust_reduce(values: Tensor, op: str) -> Tensor:
    """``values`` ``[n, ...]`` (one row per peer) reduced over peers, within the range of the honest rows whenever
    fewer than half are Byzantine: ``mean`` is the median (the mean of the middle two for an even count: the
    plain mean for two peers), ``sum`` ``n`` times it, ``max``/``min`` the
    ``(f+1)``-th largest/smallest with ``f = (n-1)//2``. Non-finite rows count as missing."""
    n = values.shape[0]
    v = values.double()
    if op in ("mean", "sum"):
        med = torch.nanquantile(torch.where(torch.isfinite(v), v, torch.nan), 0.5, dim=0)
        return med * n if op == "sum" else med
    if op not in ("max", "min"):
        raise ValueError(f"unsupported reduction {op!r}")
    f = (n - 1) // 2
    filled = torch.where(torch.isfinite(v), v, torch.tensor(-torch.inf if op == "max" else torch.inf, dtype=v.dtype))
    ordered = torch.sort(filled, dim=0, descending=op == "max").values
    return ordered[f]


def majority(decisions: Tensor) -> bool:
    """Whether more than half of the peers' boolean decisions (``[n]``, non-zero = yes) are yes."""
    return bool(2 * int((decisions != 0).sum()) > decisions.numel())
