"""Flat gradients and their parts: one fixed layout that every peer shares.

The flat gradient is every trainable parameter's gradient, in the optimizer's parameter order,
as one float32 vector. It is cut into ``n`` contiguous parts (the first ``numel % n`` parts one
element longer, as ``torch.tensor_split``); peer ``j`` aggregates part ``j``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional

import torch
from torch import Tensor

__all__ = ["part_sizes", "split_parts", "flatten_grads", "assign_grads", "trainable_params"]


def part_sizes(numel: int, n: int) -> list[int]:
    """Sizes of the ``n`` contiguous parts of a vector of ``numel`` elements."""
    if n < 1:
        raise ValueError(f"cannot cut a vector into {n} parts")
    base, extra = divmod(numel, n)
    return [base + (1 if j < extra else 0) for j in range(n)]


def split_parts(flat: Tensor, n: int) -> list[Tensor]:
    """The ``n`` parts of ``flat`` (views, no copy)."""
    return list(torch.split(flat, part_sizes(flat.numel(), n)))


def trainable_params(param_groups: Iterable[dict]) -> list[torch.nn.Parameter]:
    """The parameters an optimizer updates, in its order, each once."""
    seen: set[int] = set()
    params = []
    for group in param_groups:
        for p in group["params"]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def flatten_grads(
    params: Sequence[torch.nn.Parameter], dtype: torch.dtype = torch.float32, out: Optional[Tensor] = None
) -> Tensor:
    """All gradients as one vector (zeros where a gradient is ``None``, so the layout is the same on every peer).

    Gradients that already are their own place in ``out`` (as :func:`assign_grads` with ``views=True`` leaves them,
    and backward accumulates into them while ``zero_grad`` does not set them to ``None``) are not copied."""
    if not params:
        raise ValueError("no trainable parameters to aggregate")
    device = params[0].device
    if out is not None and any(p.grad is not None and _shares_memory(p.grad, out) for p in params):
        return _flatten_in_place(params, out)
    pieces = [
        (p.grad.detach().reshape(-1).to(dtype) if p.grad is not None else torch.zeros(p.numel(), dtype=dtype, device=device))
        for p in params
    ]
    return torch.cat(pieces) if out is None else torch.cat(pieces, out=out)


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _flatten_in_place(params: Sequence[torch.nn.Parameter], out: Tensor) -> Tensor:
    """:func:`flatten_grads` where some gradients live in ``out``: those in their own place stay, the others are
    copied (a gradient elsewhere in ``out`` first out of it, so no copy reads what another wrote)."""
    pieces: list[tuple[Tensor, Optional[Tensor]]] = []
    offset = 0
    for p in params:
        piece = out[offset : offset + p.numel()]
        offset += p.numel()
        if p.grad is None:
            pieces.append((piece, None))
        elif not _is_view_at(p.grad, piece):  # misplaced in out: taken out of it before any copy writes there
            pieces.append((piece, p.grad.detach().clone() if _shares_memory(p.grad, out) else p.grad.detach()))
    for piece, grad in pieces:
        if grad is None:
            piece.zero_()
        else:
            piece.copy_(grad.reshape(-1))
    return out


def _is_view_at(grad: Tensor, piece: Tensor) -> bool:
    return grad.dtype == piece.dtype and grad.is_contiguous() and grad.data_ptr() == piece.data_ptr() and _shares_memory(grad, piece)


def assign_grads(
    params: Sequence[torch.nn.Parameter], flat: Tensor, scale: Optional[float] = None, views: bool = False
) -> None:
    """Write ``flat`` (times ``scale``, if given) back into the parameters' ``.grad`` (created where missing), in each
    gradient's dtype. ``flat`` is only read, unless ``views``: then each gradient that can be (a contiguous float
    parameter of ``flat``'s dtype and device) becomes a view of its place in ``flat`` instead of a copy (no copy at
    all; what DDP's ``gradient_as_bucket_view`` does), and ``scale`` multiplies ``flat`` itself. ``flat`` must then
    stay unread by anything else until the optimizer has stepped (the optimizer, clipping or a scaler may change
    those gradients in place)."""
    if sum(p.numel() for p in params) != flat.numel():
        raise ValueError(f"flat gradient has {flat.numel()} elements, the parameters {sum(p.numel() for p in params)}")
    offset = 0
    if views and scale is not None:
        flat.mul_(scale)
        scale = None
    for p in params:
        chunk = flat[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
        if views and p.dtype == flat.dtype and p.device == flat.device and p.is_contiguous():
            if p.grad is None or not _is_view_at(p.grad, chunk):
                p.grad = chunk
            continue
        if p.grad is None:
            p.grad = chunk.to(p.dtype).clone()
        else:
            p.grad.copy_(chunk)
        if scale is not None:
            p.grad.mul_(scale)
