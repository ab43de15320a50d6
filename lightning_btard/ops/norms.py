"""Euclidean norms that stay right for very small and very large float32 vectors.

A float32 norm squares its elements in float32: squares below ``FLT_MIN`` (elements under ~1e-19)
underflow to zero, squares above ``FLT_MAX`` (elements over ~1.8e19) overflow. A well-trained model's
gradients do reach 1e-30 (a confident softmax), and a stopping rule or a tolerance built on a norm
that read 0 then accepts anything or nothing: CenteredClip stopped at its starting point and the
projection check banned honest aggregators, because ``residual <= rel_eps * ||v||`` read ``0 <= 0``.

:func:`safe_norm` takes the fast float32 norm and redoes it in float64 only when the float32 result
may have lost squares to underflow (it is below ``sqrt(d) * 1e-15``, where the ``d`` squares that
can vanish, each under ``FLT_MIN``, are at most ``1e-8`` of the sum) or is not finite.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["SUBNORMAL", "redo_unsure_norms", "rounding_floor", "safe_norm", "unsure_norms"]

SUBNORMAL = 2.0**-149
"""The smallest positive float32 (its spacing near zero): below it, float32 arithmetic rounds to 0."""


def unsure_norms(norms: Tensor, size: int) -> Tensor:
    """Which float32-computed norms of vectors of ``size`` elements may be wrong: not finite, or small enough that
    squares may have underflowed (below ``sqrt(size) * 1e-15``)."""
    return ~torch.isfinite(norms) | (norms < max(size, 1) ** 0.5 * 1e-15)


def redo_unsure_norms(x: Tensor, norms: Tensor, dim: Optional[int] = None) -> Tensor:
    """``norms`` (float64), computed from ``x`` in float32, with those float32 may have got wrong redone in float64."""
    unsure = unsure_norms(norms, x.numel() if dim is None else x.shape[dim])
    if not bool(unsure.any()):
        return norms
    return torch.where(unsure, torch.linalg.vector_norm(x, dim=dim, dtype=torch.float64), norms)


def safe_norm(x: Tensor, dim: Optional[int] = None) -> Tensor:
    """``||x||`` (or the norms along ``dim``) in float64, exact to float32 rounding at any scale."""
    if not x.is_floating_point():
        raise ValueError(f"safe_norm expects a floating-point tensor, got {x.dtype}")
    return redo_unsure_norms(x, torch.linalg.vector_norm(x, dim=dim).double(), dim)


def rounding_floor(size: int) -> float:
    """The absolute error float32 leaves in a sum of ``size`` terms near zero (``size`` subnormal spacings):
    a tolerance below it would demand more than float32 can represent."""
    return float(size) * SUBNORMAL
