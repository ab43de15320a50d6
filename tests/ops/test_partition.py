"""Flat gradients: the layout every peer shares, and gradients that are views of the aggregate (no copy)."""

from __future__ import annotations

import pytest
import torch

from lightning_btard.ops.partition import assign_grads, flatten_grads, part_sizes, split_parts


def params_of(*shapes: tuple[int, ...], dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=g).to(dtype)) for s in shapes]


def expected_flat(grads: list) -> torch.Tensor:
    return torch.cat([g.reshape(-1).float() for g in grads])


def test_parts_cover_the_vector_in_order() -> None:
    assert part_sizes(10, 4) == [3, 3, 2, 2]
    x = torch.arange(10.0)
    assert torch.equal(torch.cat(split_parts(x, 4)), x)
    with pytest.raises(ValueError):
        part_sizes(3, 0)


def test_views_then_backward_in_place_then_flatten_without_copy() -> None:
    params = params_of((3, 4), (5,), (2, 2))
    for p in params:
        p.grad = torch.randn_like(p)
    flat = flatten_grads(params, out=torch.empty(21))
    aggregate = flat * 2  # stands for the round's result, written into the flat buffer
    flat.copy_(aggregate)
    assign_grads(params, flat, views=True)
    for p, piece in zip(params, split_parts(flat, 1)[0].split([p.numel() for p in params])):
        assert p.grad.data_ptr() == piece.data_ptr() and p.grad.shape == p.shape
    # zero_grad(set_to_none=False) zeroes them in place, backward accumulates into them: flat holds the new gradient
    loss = sum((p * (i + 1)).sum() for i, p in enumerate(params))
    for p in params:
        p.grad.zero_()
    loss.backward()
    assert torch.equal(flat, torch.cat([torch.full((p.numel(),), float(i + 1)) for i, p in enumerate(params)]))
    before = flat.clone()
    assert flatten_grads(params, out=flat) is flat
    assert torch.equal(flat, before)
    # the optimizer sees the views: clipping in place scales flat too (nobody else reads it unverified)
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    assert torch.allclose(flat.norm(), torch.tensor(0.5))


def test_a_mix_of_views_fresh_missing_and_misplaced_gradients_flattens_to_the_true_values() -> None:
    params = params_of((4,), (3,), (2,), (4,))
    flat = torch.zeros(13)
    assign_grads(params, torch.arange(13.0, out=flat), views=True)
    original = flat.clone()
    params[0].grad = torch.full((4,), -1.0)  # backward allocated new ones (zero_grad had set them to None)
    params[1].grad = torch.full((3,), -2.0)
    params[2].grad = None  # unused this step
    params[3].grad = flat[0:4]  # a view of flat, but of parameter 0's place, which is written first
    want = torch.cat([torch.full((4,), -1.0), torch.full((3,), -2.0), torch.zeros(2), original[0:4]])
    assert torch.equal(flatten_grads(params, out=flat), want)


def test_views_only_where_the_layout_allows_and_scale_applies_once() -> None:
    contiguous, transposed = params_of((2, 3), (3, 2))
    transposed = torch.nn.Parameter(transposed.detach().t())  # a non-contiguous parameter: its gradient is a copy
    half = params_of((4,), dtype=torch.bfloat16)[0]  # another dtype: a copy in that dtype
    params = [contiguous, transposed, half]
    flat = torch.arange(16.0)
    assign_grads(params, flat, scale=0.5, views=True)
    assert torch.equal(flat, torch.arange(16.0) * 0.5)  # scaled once, in place
    assert contiguous.grad.data_ptr() == flat.data_ptr()
    assert transposed.grad.data_ptr() != flat[6:].data_ptr() and torch.equal(transposed.grad.reshape(-1), flat[6:12])
    assert half.grad.dtype == torch.bfloat16 and torch.equal(half.grad.float(), flat[12:])
    assert torch.equal(flatten_grads(params, out=flat), torch.arange(16.0) * 0.5)


def test_copies_by_default_and_a_wrong_size_is_refused_before_anything_changes() -> None:
    params = params_of((3,), (2,))
    flat = torch.arange(5.0)
    assign_grads(params, flat)
    assert all(p.grad.data_ptr() != flat.data_ptr() for p in params)
    params[0].grad.add_(1)
    assert torch.equal(flat, torch.arange(5.0))
    with pytest.raises(ValueError, match="5 elements"):
        assign_grads(params + params_of((1,)), flat, views=True)
    assert params[0].grad.data_ptr() != flat.data_ptr()
