"""safe_norm against float64 norms at scales where float32 squares underflow or overflow."""

from __future__ import annotations

import pytest
import torch

from lightning_btard.ops.norms import SUBNORMAL, rounding_floor, safe_norm
from lightning_btard.ops.projection import accurate_norms


@pytest.mark.parametrize("scale", [1e-40, 1e-30, 1e-20, 1e-3, 1.0, 1e15, 1e20, 1e30])
def test_safe_norm_matches_float64_at_every_scale(scale: float) -> None:
    x = (torch.randn(7, 3001, generator=torch.Generator().manual_seed(1)).double() * scale).float()
    ref = x.double().norm(dim=1)
    assert torch.allclose(safe_norm(x, dim=1), ref, rtol=1e-5, atol=0)
    assert torch.allclose(accurate_norms(x), ref, rtol=1e-6, atol=0)
    assert torch.allclose(safe_norm(x[2]), ref[2], rtol=1e-5, atol=0)
    assert safe_norm(x).dtype == torch.float64


def test_plain_float32_norm_does_underflow_here() -> None:
    """What safe_norm guards against (if torch ever scales its float32 norms, the guard is only redundant)."""
    x = torch.full((500,), 1e-25)
    assert float(torch.linalg.vector_norm(x)) == 0.0
    assert float(safe_norm(x)) == pytest.approx(1e-25 * 500**0.5, rel=1e-6)


def test_zero_vectors_and_the_rounding_floor() -> None:
    assert float(safe_norm(torch.zeros(10))) == 0.0
    assert torch.equal(safe_norm(torch.zeros(3, 10), dim=1), torch.zeros(3, dtype=torch.float64))
    assert rounding_floor(1000) == 1000 * SUBNORMAL
    assert torch.tensor(SUBNORMAL, dtype=torch.float32).item() > 0
    assert torch.tensor(SUBNORMAL / 2, dtype=torch.float32).item() == 0.0
    with pytest.raises(ValueError):
        safe_norm(torch.arange(4))


def test_a_well_formed_part_is_finite_and_within_the_bound() -> None:
    from lightning_btard.ops.finite import MAX_PART_NORM, well_formed_part

    assert well_formed_part(torch.full((4,), 1e-40)) and well_formed_part(torch.full((4,), 0.4 * MAX_PART_NORM))
    for bad in (torch.tensor([1.0, float("nan")]), torch.tensor([1.0, float("inf")]), torch.full((4,), 3e38),
                torch.full((4,), MAX_PART_NORM)):
        assert not well_formed_part(bad)
    assert not well_formed_part(torch.zeros(3), norm=float("nan")) and well_formed_part(torch.zeros(3), norm=1.0)
