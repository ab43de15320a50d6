"""Finiteness checks that cost one read in the common case."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["MAX_PART_NORM", "all_finite", "finite_rows", "well_formed_part"]

MAX_PART_NORM = 1e18
"""The largest gradient part (L2 norm) the protocol handles. Above about 1e19 the float32 sums of squares in
CenteredClip's check overflow, and no honest gradient comes near it (a model that large has diverged), so a part
beyond this is malformed, like a NaN: its signed copy bans its sender alone."""


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


def well_formed_part(x: Tensor, norm: float | None = None) -> bool:
    """Finite and of norm at most :data:`MAX_PART_NORM` (``norm``: its float64 norm when already known). One read at
    most: the norm is NaN or infinite exactly when an element is."""
    from lightning_btard.ops.norms import safe_norm

    value = float(safe_norm(x)) if norm is None else norm
    return math.isfinite(value) and value <= MAX_PART_NORM


def all_finite(x: Tensor) -> bool:
    """Whether every value of ``x`` is finite: a sum first (one read), the elementwise check only if it fails."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())
