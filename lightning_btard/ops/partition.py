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
    """All gradients as one vector (zeros where a gradient is ``None``, so the layout is the same on every peer)."""
    if not params:
        raise ValueError("no trainable parameters to aggregate")
    device = params[0].device
    pieces = [
        (p.grad.detach().reshape(-1).to(dtype) if p.grad is not None else torch.zeros(p.numel(), dtype=dtype, device=device))
        for p in params
    ]
    return torch.cat(pieces) if out is None else torch.cat(pieces, out=out)


def assign_grads(params: Sequence[torch.nn.Parameter], flat: Tensor, scale: Optional[float] = None) -> None:
    """Write ``flat`` (times ``scale``, if given) back into the parameters' ``.grad`` (created where missing), in each
    gradient's dtype. ``flat`` is only read."""
    offset = 0
    for p in params:
        chunk = flat[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
        if p.grad is None:
            p.grad = chunk.to(p.dtype).clone()
        else:
            p.grad.copy_(chunk)
        if scale is not None:
            p.grad.mul_(scale)
    if offset != flat.numel():
        raise ValueError(f"flat gradient has {flat.numel()} elements, the parameters {offset}")
