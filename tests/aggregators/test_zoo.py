"""The aggregation zoo, each rule against an independent computation (numpy loops, a generic optimiser), its
options from YAML-like dicts, and the server topology over in-process peers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peers import run_peers

from lightning_btard.aggregators import AGGREGATORS, resolve_aggregator
from lightning_btard.errors import UserError
from lightning_btard.protocol.butterfly import butterfly_aggregate

ZOO = ["coordinate_median", "trimmed_mean", "geometric_median", "krum", "multi_krum", "bucketing", "nnm"]


def rows(k: int, d: int, seed: int, outliers: int = 0) -> torch.Tensor:
    x = torch.randn(k, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:outliers] = x[:outliers] * 50 + 100
    return x


@st.composite
def matrices(draw, min_k: int = 1):
    k = draw(st.integers(min_k, 9))
    d = draw(st.integers(1, 7))
    seed = draw(st.integers(0, 10_000))
    return rows(k, d, seed, outliers=draw(st.integers(0, (k - 1) // 2)))


def test_every_rule_is_registered_and_reports_the_common_statistics() -> None:
    x = rows(7, 5, 0, outliers=2)
    for name in ZOO:
        assert name in AGGREGATORS
        result = resolve_aggregator(name)(x)
        assert result.value.shape == (5,) and set(result.stats) >= {"clipped", "iterations", "residual"}


@settings(max_examples=60, deadline=None)
@given(matrices())
def test_coordinate_median_is_numpys_lower_median(x: torch.Tensor) -> None:
    k = x.shape[0]
    expected = np.sort(x.numpy(), axis=0)[(k - 1) // 2]
    assert np.array_equal(resolve_aggregator("coordinate_median")(x).value.numpy(), expected)


@settings(max_examples=60, deadline=None)
@given(matrices(), st.integers(0, 4))
def test_trimmed_mean_drops_the_extremes_of_each_coordinate(x: torch.Tensor, trim: int) -> None:
    k, d = x.shape
    b = min(trim, (k - 1) // 2)
    expected = [np.mean(sorted(x[:, c].tolist())[b:k - b]) for c in range(d)]
    got = resolve_aggregator("trimmed_mean", {"trim": trim})(x)
    assert np.allclose(got.value.numpy(), expected, rtol=1e-12, atol=1e-12) and got.stats["clipped"] == 2 * b


def sum_of_distances(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x - v, dim=1).sum()


def lbfgs_minimiser(x: torch.Tensor) -> torch.Tensor:
    """An independent minimiser of the sum of distances: L-BFGS from the coordinate median."""
    v = x.median(dim=0).values.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([v], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        c = sum_of_distances(x, v)
        c.backward()
        return c

    opt.step(closure)
    return v.detach()


def test_geometric_median_minimises_the_sum_of_distances() -> None:
    for seed in range(5):
        x = rows(9, 6, seed, outliers=3)
        z = resolve_aggregator("geometric_median", {"tol": 1e-12, "max_iters": 10_000})(x).value
        v = lbfgs_minimiser(x)
        assert float(sum_of_distances(x, z)) <= float(sum_of_distances(x, v)) + 1e-9
        assert torch.allclose(z, v, atol=1e-5)
        # first-order optimality: the unit vectors towards the rows cancel
        u = (x - z) / torch.linalg.vector_norm(x - z, dim=1, keepdim=True)
        assert float(torch.linalg.vector_norm(u.sum(0))) < 1e-5


def test_geometric_median_in_one_dimension_is_the_median() -> None:
    x = torch.tensor([[1.0], [2.0], [7.0], [100.0], [-3.0]], dtype=torch.float64)
    z = resolve_aggregator("geometric_median", {"tol": 1e-14, "max_iters": 100_000, "nu": 1e-14})(x).value
    assert abs(float(z) - 2.0) < 1e-5


def krum_reference(x: np.ndarray, f: int, m: int) -> np.ndarray:
    k = len(x)
    scores = []
    for i in range(k):
        d = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(k) if j != i)
        scores.append(sum(d[: max(k - f - 2, 1)]))
    chosen = np.argsort(scores, kind="stable")[:m]
    return x[chosen].mean(axis=0)


@settings(max_examples=60, deadline=None)
@given(matrices(min_k=3), st.integers(0, 3))
def test_krum_and_multi_krum_pick_the_rows_of_lowest_score(x: torch.Tensor, f: int) -> None:
    k = x.shape[0]
    f_used = min(f, max((k - 3) // 2, 0))
    krum = resolve_aggregator("krum", {"f": f})(x)
    assert np.allclose(krum.value.numpy(), krum_reference(x.numpy(), f_used, 1))
    multi = resolve_aggregator("multi_krum", {"f": f})(x)
    assert np.allclose(multi.value.numpy(), krum_reference(x.numpy(), f_used, k - f_used))
    assert multi.stats["clipped"] == f_used


def test_bucketing_averages_seeded_buckets_then_applies_the_inner_rule() -> None:
    x = rows(8, 4, 3, outliers=2)
    agg = resolve_aggregator("bucketing", {"bucket_size": 3, "inner": "coordinate_median", "seed": 5})
    for call in range(3):
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(5 * 1_000_003 + call)).numpy()
        buckets = [perm[i:i + 3] for i in range(0, 8, 3)]
        means = np.stack([x.numpy()[b].mean(axis=0) for b in buckets])
        expected = np.sort(means, axis=0)[(len(means) - 1) // 2]
        assert np.allclose(agg(x).value.numpy(), expected)
    # a bucket of one with the mean inside is the mean
    assert torch.allclose(resolve_aggregator("bucketing", {"bucket_size": 1, "inner": "mean"})(x).value, x.mean(0))


@settings(max_examples=40, deadline=None)
@given(matrices(min_k=2), st.integers(0, 4))
def test_nearest_neighbour_mixing_averages_each_rows_nearest(x: torch.Tensor, f: int) -> None:
    k = x.shape[0]
    f_used = min(f, k - 1)
    a = x.numpy()
    mixed = []
    for i in range(k):
        d = [(0.0 if j == i else float(np.linalg.norm(a[i] - a[j])), j != i, j) for j in range(k)]
        nearest = [j for _, _, j in sorted(d)[: k - f_used]]
        mixed.append(a[nearest].mean(axis=0))
    got = resolve_aggregator("nnm", {"f": f, "inner": "mean"})(x)
    assert np.allclose(got.value.numpy(), np.mean(mixed, axis=0))


def test_masked_rows_are_left_out_and_other_weights_refused() -> None:
    x = rows(5, 3, 1)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    for name in ZOO:
        agg = resolve_aggregator(name, {"seed": 0} if name == "bucketing" else None)
        if name == "bucketing":  # the same buckets on both calls
            ref = resolve_aggregator(name, {"seed": 0})(x[mask > 0])
        else:
            ref = agg(x[mask > 0])
        assert torch.allclose(agg(x, mask).value, ref.value), name
        with pytest.raises(UserError, match="0/1 mask"):
            agg(x, torch.full((5,), 0.5))


def test_options_are_checked_by_name() -> None:
    with pytest.raises(UserError, match=r"'krum' has no option\(s\) \['trim'\]; its options: \['f'\]"):
        resolve_aggregator("krum", {"trim": 1})
    with pytest.raises(UserError, match="whole number"):
        resolve_aggregator("trimmed_mean", {"trim": 1.5})
    with pytest.raises(UserError, match="cannot wrap itself"):
        resolve_aggregator("bucketing", {"inner": "bucketing"})
    with pytest.raises(UserError, match="unknown aggregator 'median'"):
        resolve_aggregator("bucketing", {"inner": "median"})
    # the strategy's common options reach the rules that take them; the rule's own win
    cc = resolve_aggregator("centered_clip", {"tau": 3.0}, tau=1.0, eps=0.0, max_iters=10)
    assert cc.tau == 3.0 and cc.max_iters == 10


def test_the_strategy_runs_other_rules_unverified_and_says_why_not_verified() -> None:
    from lightning_btard import BTARDStrategy

    s = BTARDStrategy(aggregator="krum", aggregator_options={"f": 2})
    assert not s.verify and repr(s.aggregator) == "Krum(f=2, m=1)"
    with pytest.raises(UserError, match="verify=True checks CenteredClip aggregates, not 'krum'"):
        BTARDStrategy(aggregator="krum", verify=True)
    server = BTARDStrategy(aggregator="centered_clip", topology="server")
    assert not server.verify and server.topology == "server"
    with pytest.raises(UserError, match="parameter-server baseline: use verify=False"):
        BTARDStrategy(topology="server", verify=True)


@pytest.mark.parametrize("name", ["geometric_median", "centered_clip"])
def test_server_topology_aggregates_whole_vectors_at_peer_zero(name: str) -> None:
    peers = run_peers
    n = 4
    x = rows(n, 50, 7, outliers=1).to(torch.float32)
    agg = resolve_aggregator(name, {"tau": 0.5} if name == "centered_clip" else {"tol": 1e-10, "max_iters": 1000})
    results = peers(n, lambda t: butterfly_aggregate(x[t.rank].clone(), t, agg, topology="server"))
    whole = agg(x.clone()).value
    for value, _ in results:
        assert torch.equal(value, results[0][0])
        assert torch.allclose(value, whole, atol=1e-5)
    # the butterfly takes the rule part by part: for a rule that is not separable the two differ
    parted = peers(n, lambda t: butterfly_aggregate(x[t.rank].clone(), t, agg))[0][0]
    assert not torch.allclose(parted, whole, atol=1e-4)
