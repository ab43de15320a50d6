"""The kept parameter copies a validator recomputes from (``recomputation.Recomputer``)."""

from __future__ import annotations

import pytest
import torch

from lightning_btard.recomputation import Recomputer


def _params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(3, 4, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]


def _values(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _step(params) -> None:  # what an optimizer step does to them
    with torch.no_grad():
        for p in params:
            p.mul_(0.5).add_(1.0)


@pytest.mark.parametrize("current", [None, 6])
def test_a_kept_step_is_loaded_and_the_parameters_come_back_exactly(current) -> None:
    r = Recomputer(run_seed=0, accumulate=1, devices=[torch.device("cpu")])
    params = _params()
    x5 = _values(params)
    r.snapshot(5, params)
    _step(params)
    x6 = _values(params)
    r.snapshot(6, params)
    r.load(5, params, current=current)
    assert r.loaded and all(torch.equal(p, v) for p, v in zip(params, x5))
    with pytest.raises(RuntimeError, match="already loaded"):
        r.load(5, params)
    with torch.no_grad():  # whatever the recomputation left in them, restore puts x6 back
        params[0].zero_()
    r.restore(params)
    assert not r.loaded and all(torch.equal(p, v) for p, v in zip(params, x6))
    # against the snapshot just taken, the current values need no copy of their own
    assert (r._stash == []) == (current is not None)
    r.restore(params)  # nothing loaded: nothing happens
    assert all(torch.equal(p, v) for p, v in zip(params, x6))


def test_the_snapshot_to_restore_is_not_recycled_while_loaded() -> None:
    r = Recomputer(run_seed=0, accumulate=1, devices=[torch.device("cpu")])
    params = _params()
    r.snapshot(5, params)
    _step(params)
    r.snapshot(6, params)
    r.load(5, params, current=6)
    with pytest.raises(RuntimeError, match="restore them before"):
        r.snapshot(6, params)
    r.restore(params)
    r.snapshot(7, params)  # the next step: 5 is forgotten, 6 kept
    assert r.has(6) and r.has(7) and not r.has(5)
