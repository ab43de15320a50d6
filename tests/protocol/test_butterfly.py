"""ButterflyClip: the round equals CenteredClip applied part by part, over in-process and gloo peers."""

from __future__ import annotations

import pytest
import torch
from peers import run_peers
from procs import run_ranks

from lightning_btard.aggregators import resolve_aggregator
from lightning_btard.ops.centered_clip import centered_clip
from lightning_btard.ops.partition import part_sizes, split_parts
from lightning_btard.protocol.butterfly import butterfly_aggregate


def partwise_reference(inputs: torch.Tensor, tau: float) -> torch.Tensor:
    n = inputs.shape[0]
    parts = [torch.stack([split_parts(x, n)[j] for x in inputs]) for j in range(n)]
    return torch.cat([centered_clip(p, tau, eps=1e-7) for p in parts])


def test_part_sizes_cover_the_vector() -> None:
    for numel in (0, 1, 5, 17, 1000):
        for n in (1, 2, 3, 7):
            sizes = part_sizes(numel, n)
            assert sum(sizes) == numel and max(sizes) - min(sizes) <= 1 and len(sizes) == n


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_round_equals_partwise_centered_clip(n: int, peers) -> None:
    g = torch.Generator().manual_seed(n)
    inputs = torch.randn(n, 1003, generator=g)
    inputs[0] *= 300.0
    agg = resolve_aggregator("centered_clip", tau=0.5, eps=1e-7)
    results = peers(n, lambda t: butterfly_aggregate(inputs[t.rank].clone(), t, agg))
    expected = partwise_reference(inputs, 0.5)
    for value, stats in results:
        assert torch.equal(value, results[0][0])  # every peer holds the same bytes
        assert torch.allclose(value, expected, atol=1e-6)
        assert stats.part_stats.shape == (n, 4)
        assert float(stats.part_stats[:, 2].max()) <= 1e-7  # residual of every part


def test_malformed_parts_are_excluded_not_aggregated(peers) -> None:
    n = 4
    inputs = torch.randn(n, 40)
    inputs[2, 3] = float("nan")  # peer 2's part 0 is malformed
    agg = resolve_aggregator("mean")
    results = peers(n, lambda t: butterfly_aggregate(inputs[t.rank].clone(), t, agg))
    value, stats = results[0]
    sizes = part_sizes(40, n)
    assert torch.allclose(value[: sizes[0]], inputs[[0, 1, 3], : sizes[0]].mean(0))
    assert torch.allclose(value[sizes[0] :], inputs[:, sizes[0] :].mean(0))
    assert stats.summary()["malformed"] == 1.0


@pytest.mark.timeout(180)
def test_gloo_round_over_four_processes(tmp_path) -> None:
    run_ranks("butterfly_ranks.py", 4, [str(tmp_path), "10007"], timeout=150)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    inputs = got[0]["inputs"]
    expected_clip = partwise_reference(inputs, 0.5)
    for r in got:
        # tau = inf is the plain mean, as all_reduce computes it
        assert torch.allclose(r["mean_bf"], r["all_reduce_mean"], rtol=1e-5, atol=1e-5)
        assert torch.allclose(r["mean_bf"], inputs.mean(0), atol=1e-5)
        # with an outlier peer: CenteredClip of every part, identical on every peer
        assert torch.equal(r["clip_bf"], got[0]["clip_bf"])
        assert torch.allclose(r["clip_bf"], expected_clip, atol=1e-6)
        assert float((r["clip_bf"] - inputs.mean(0)).norm()) > 10  # the mean is ruined, the clip is not


def test_all_parts_malformed_gives_nan_not_a_crash() -> None:
    """An undefended run that diverged on every peer keeps going (with NaN), as plain averaging would."""
    inputs = torch.full((3, 12), float("nan"))
    agg = resolve_aggregator("centered_clip", tau=1.0)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        results = run_peers(3, lambda t: butterfly_aggregate(inputs[t.rank].clone(), t, agg))
    value, stats = results[0]
    assert torch.isnan(value).all() and stats.summary()["malformed"] == 9.0
