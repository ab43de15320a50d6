"""Finiteness checks that cost one read in the common case."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["all_finite", "finite_rows"]


def finite_rows(x: Tensor) -> Tensor:
    """``[n]`` bool: which rows of ``[n, d]`` ``x`` hold only finite values.

    A row's sum is finite unless the row holds a NaN/Inf (or values near float overflow), so the
    exact elementwise check runs only on rows whose sum is not finite.
    """
    ok = torch.isfinite(x.sum(dim=1))
    if not bool(ok.all()):
        for i in (~ok).nonzero().flatten().tolist():
            ok[i] = bool(torch.isfinite(x[i]).all())
    return ok


def all_finite(x: Tensor) -> bool:
    """Whether every value of ``x`` is finite: a sum first (one read), the elementwise check only if it fails."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())
