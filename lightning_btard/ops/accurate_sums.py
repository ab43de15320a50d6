"""Dot products and norms of float32 vectors with float64 accuracy, at float32 speed.

One long float32 reduction over millions of elements errs by up to ~1e-5 relative (measured on 2.8M); float32
products over chunks of 1024 elements, the chunk sums added in float64, err by ~3e-7 at the cost of one float32
pass (a float64 pass takes ~10x longer). The projection check's numbers and CenteredClip's Gram matrix need it:
a Gram matrix from one float32 product over 3.7M elements left CenteredClip of two far-apart ResNet18 parts
12x short of its residual target, and the projection check then banned the honest aggregator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_btard.ops.norms import redo_unsure_norms

__all__ = ["accurate_dots", "accurate_norms"]

_CHUNK = 1024


def accurate_dots(z: Tensor, x: Tensor) -> Tensor:
    """``z @ x`` in float64 from float32 chunk sums: ``[k, d] @ [d] -> [k]``, or ``[k, d]`` against the rows of
    ``[n, d]`` ``-> [k, n]`` (one pass over ``z`` for all rows: these products are memory-bound)."""
    single = x.dim() == 1
    xs = (x[None] if single else x).to(z.dtype)
    n = xs.shape[0]
    k, d = z.shape
    m = d // _CHUNK
    r = m * _CHUNK
    out = torch.zeros(k, n, dtype=torch.float64, device=x.device)
    if m:
        # (m, k, C) @ (m, C, n): strided views, no copies
        chunks = torch.bmm(z[:, :r].reshape(k, m, _CHUNK).transpose(0, 1), xs[:, :r].reshape(n, m, _CHUNK).permute(1, 2, 0))
        out += chunks.double().sum(0)
    if r < d:
        out += z[:, r:].double() @ xs[:, r:].double().T
    return out[:, 0] if single else out


def accurate_norms(x: Tensor) -> Tensor:
    """Float64-accurate norms of the rows of ``[n, d]`` (float32 chunk norms combined in float64, no float64 copy)."""
    n, d = x.shape
    m = d // _CHUNK
    r = m * _CHUNK
    sq = torch.zeros(n, dtype=torch.float64, device=x.device)
    if m:
        sq += torch.linalg.vector_norm(x[:, :r].reshape(n, m, _CHUNK), dim=2).double().square().sum(1)
    if r < d:
        sq += x[:, r:].double().square().sum(1)
    return redo_unsure_norms(x, sq.sqrt(), dim=1)
