"""Robust reductions over peers: inside the honest range whatever a minority sends, and the plain answer when
everybody is honest and agrees."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_btard.ops.robust_reduce import majority, robust_reduce


def test_honest_values() -> None:
    v = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
    assert torch.equal(robust_reduce(v, "mean"), torch.tensor([2.0, 20.0], dtype=torch.float64))  # two peers: the mean
    assert torch.equal(robust_reduce(v, "sum"), torch.tensor([4.0, 40.0], dtype=torch.float64))
    three = torch.tensor([1.0, 5.0, 3.0])[:, None]
    assert robust_reduce(three, "max").item() == 3.0 and robust_reduce(three, "min").item() == 3.0  # f = 1
    assert majority(torch.tensor([1.0, 0.0, 1.0])) and not majority(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError):
        robust_reduce(three, "prod")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    honest=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=8),
    byzantine=st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(1e300)), max_size=7),
    op=st.sampled_from(["mean", "max", "min"]),
)
def test_a_minority_cannot_leave_the_honest_range(honest: list[float], byzantine: list[float], op: str) -> None:
    byzantine = byzantine[: max(0, len(honest) - 1)]  # fewer than half
    values = torch.tensor(honest + byzantine, dtype=torch.float64)[:, None]
    got = robust_reduce(values[torch.randperm(len(values), generator=torch.Generator().manual_seed(0))], op).item()
    assert math.isfinite(got) and min(honest) - 1e-9 <= got <= max(honest) + 1e-9
