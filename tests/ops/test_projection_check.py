"""The CenteredClip check on random projections: never flags an honest aggregate, catches a 0.1% bias; the bound on an
honest aggregate's norm that the senders' parts give, against fixed points computed independently."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

from lightning_btard.ops.centered_clip import centered_clip_with_stats
from lightning_btard.ops.projection import (
    LazyDirections,
    ProjectionCheck,
    accurate_dots,
    aggregate_norm_bound,
    clipped_projections,
    random_directions,
)

REL = 5e-7  # the solver's residual target, relative to ||G||; the check allows twice that


def published(parts: torch.Tensor, aggregate: torch.Tensor, tau: float, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    numbers = [clipped_projections(z, g, aggregate, tau) for g in parts]
    return torch.stack([s for s, _, _ in numbers]), torch.tensor([norm for _, norm, _ in numbers], dtype=torch.float64)


def test_accurate_dots_match_float64() -> None:
    g = torch.Generator().manual_seed(0)
    for d in (1, 1023, 1024, 5000, 300_001):
        z = torch.randn(3, d, generator=g)
        x = torch.randn(d, generator=g) * 0.01 + 2.0  # a large mean: the hard case for float32 sums
        exact = z.double() @ x.double()
        assert torch.allclose(accurate_dots(z, x), exact, rtol=0, atol=1e-6 * float(x.double().norm()))


@pytest.mark.parametrize("rows", [1, 4])
def test_clipped_projections_over_chunks_match_float64(rows: int) -> None:
    """The numbers, computed chunk by chunk (chunks shrunk to 16 KiB here: several chunks, 1024-element pieces and a
    remainder), against float64 on the whole vectors: a part equal to the aggregate, parts 1e-25 from a tiny one
    (float32 loses their squares: the norm is redone) and a large common component (float32's hard case)."""
    from lightning_btard.ops import projection

    g = torch.Generator().manual_seed(1)
    d, k, tau = 9 * 1024 + 77, 2, 0.7
    z = torch.randn(k, d, generator=g)
    large = torch.randn(d, generator=g) * 0.01 + 3.0
    tiny = torch.randn(d, generator=g) * 1e-20
    cases = [(large, large + torch.randn(4, d, generator=g) * torch.tensor([[0.0], [1e-3], [1.0], [5.0]])),
             (tiny, tiny + torch.randn(4, d, generator=g) * torch.tensor([[1e-25], [1e-24], [1e-21], [1.0]]))]
    for (aggregate, parts), chosen in [(case, [i]) for case in cases for i in range(4)] if rows == 1 else [(case, [0, 1, 2, 3]) for case in cases]:
        gs = parts[chosen]
        with mock.patch.object(projection, "_PROJECTION_CHUNK_BYTES", 1 << 14):
            s, norms, p = clipped_projections(z, gs[0] if rows == 1 else gs, aggregate, tau)
        diff = gs.double() - aggregate.double()
        exact_norms = diff.norm(dim=1)
        c = torch.clamp(tau / exact_norms.clamp_min(1e-300), max=1.0)
        exact_s = (diff @ z.double().T) * c[:, None]
        exact_p = gs.double() @ z.double().T
        got_norms = torch.tensor([norms], dtype=torch.float64) if rows == 1 else norms
        assert torch.allclose(got_norms, exact_norms, rtol=1e-6, atol=0)
        assert torch.allclose(s.reshape(exact_s.shape), exact_s, rtol=0, atol=1e-6 * float((c * exact_norms).max()) + 1e-30)
        assert torch.allclose(p.reshape(exact_p.shape), exact_p, rtol=0, atol=1e-6 * float(gs.double().norm(dim=1).max()))


def test_directions_are_shared_and_seed_dependent() -> None:
    a = random_directions(b"seed", 3, 100, 2)
    assert torch.equal(a, random_directions(b"seed", 3, 100, 2))
    assert not torch.equal(a, random_directions(b"seed", 4, 100, 2))
    assert not torch.equal(a, random_directions(b"other", 3, 100, 2))


@pytest.mark.parametrize("tau", [0.3, 1.0])
def test_catches_a_biased_aggregate_and_never_flags_an_honest_one(tau: float) -> None:
    trials = int(os.environ.get("BTARD_CHECK_TRIALS", "1000"))
    check = ProjectionCheck(tau=tau)
    gen = torch.Generator().manual_seed(int(tau * 10))
    honest_flags = misses = 0
    for trial in range(trials):
        n, d = 8, 1500
        center = torch.randn(d, generator=gen) * (1.0 / d**0.5)
        parts = center + torch.randn(n, d, generator=gen) * (0.5 / d**0.5)
        parts[:3] = torch.randn(3, d, generator=gen) * (50.0 / d**0.5)  # Byzantine parts: clipping stays active
        weights = torch.ones(n)
        result = centered_clip_with_stats(parts, tau, eps=0.0, rel_eps=REL)
        G = result.value
        bound = 2 * REL * float(G.double().norm())
        # the aggregator's bias is chosen before the directions are drawn (the MPRNG reveals them later)
        u = torch.randn(d, generator=gen)
        biased = G + 1e-3 * float(G.norm()) * u / u.norm()
        z = random_directions(trial.to_bytes(4, "little"), 0, d, k=2)
        s, norms = published(parts, G, tau, z)
        honest_flags += not check.passes(weights, s, norms, bound)
        s_b, norms_b = published(parts, biased, tau, z)
        misses += check.passes(weights, s_b, norms_b, 2 * REL * float(biased.double().norm()))
    assert honest_flags == 0
    print(f"tau={tau}: {honest_flags} honest aggregates flagged, {misses} of {trials} biased ones missed")
    assert misses <= trials // 1000, f"missed {misses} of {trials} biased aggregates"


def _fixed_point(x: torch.Tensor, tau: float, w: torch.Tensor, iters: int = 20_000) -> torch.Tensor:
    """CenteredClip's fixed point by plain float64 reweighting from the coordinate median (independent of ops/)."""
    x, w = x.double(), w.double()
    v = x[w > 0].median(0).values
    for _ in range(iters):
        c = torch.clamp(tau / (x - v).norm(dim=1).clamp_min(1e-300), max=1.0) * w
        v = (c[:, None] * x).sum(0) / c.sum()
    return v


CASES = {
    "clustered": lambda g: (torch.randn(8, 50, generator=g) * 0.3 + 1.0, 1.0),
    "spread": lambda g: (torch.randn(8, 50, generator=g) * 5.0, 1.0),
    "tiny-and-one-large": lambda g: (torch.cat([torch.randn(3, 50, generator=g) * 1e-33, torch.randn(1, 50, generator=g)]), 1.0),
    "even-split-far-apart": lambda g: (torch.cat([torch.zeros(2, 50) + 0.01, torch.full((2, 50), 20.0)]), 1.0),
    "small-tau": lambda g: (torch.randn(7, 50, generator=g) + 3.0, 0.05),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_aggregate_norm_bound_holds_and_a_minority_cannot_raise_it(case) -> None:
    g = torch.Generator().manual_seed(1)
    x, tau = CASES[case](g)
    n = x.shape[0]
    for w in (torch.ones(n), torch.tensor([0.0] + [1.0] * (n - 1))):  # a validator's weight is 0
        v = _fixed_point(x, tau, w)
        bound = aggregate_norm_bound(x.double().norm(dim=1), w, tau)
        assert float(v.norm()) <= bound * (1 + 1e-9), (float(v.norm()), bound)
        # a Byzantine minority sending huge parts does not raise it past what the others' norms allow
        contributing = x[w > 0]
        minority = (len(contributing) - 1) // 2
        assert minority >= 1
        bad = x.clone()
        bad[-minority:] = 1e10
        raised = aggregate_norm_bound(bad.double().norm(dim=1), w, tau)
        assert raised <= n * float(contributing[:-minority].double().norm(dim=1).max()) + tau
        assert float(_fixed_point(bad, tau, w).norm()) <= raised * (1 + 1e-9)


@pytest.mark.parametrize("shape", ["pair", "constant", "sparse"])
def test_a_structured_bias_chosen_before_the_draw_is_caught(shape: str) -> None:
    """Random-sign directions are orthogonal to ``e_1 - e_2`` half the time, and to the constant vector of an even
    part often: an aggregator shifted along such a vector by any amount passed (found by the adversary tests, a
    shift of 20,000 tau along the constant vector in ~2% of rounds). Continuous directions have no such atom."""
    check = ProjectionCheck(tau=1.0)
    gen = torch.Generator().manual_seed(1)
    n, d, trials = 5, 42, 400
    parts = torch.randn(n, d, generator=gen) * 0.05
    G = centered_clip_with_stats(parts, 1.0, eps=0.0, rel_eps=REL).value
    u = {"pair": torch.eye(d)[0] - torch.eye(d)[1], "constant": torch.ones(d),
         "sparse": torch.eye(d)[:4].sum(0) - torch.eye(d)[4:8].sum(0)}[shape]
    biased = G + 20_000.0 * u
    misses = 0
    # the round's tolerance: relative to no more than the senders' parts allow an honest aggregate (protocol/round.py)
    bound = 2 * REL * 2 * aggregate_norm_bound(parts.double().norm(dim=1), torch.ones(n, dtype=torch.float64), 1.0)
    for trial in range(trials):
        z = random_directions(trial.to_bytes(4, "little") + shape.encode(), 0, d, k=2)
        s, norms = published(parts, biased, 1.0, z)
        misses += check.passes(torch.ones(n), s, norms, bound)
    assert misses == 0, f"{misses} of {trials} shifted aggregates passed"


def test_lazy_directions_equal_each_parts_own_draw_and_hold_one_part() -> None:
    sizes = [7, 5, 7]
    buffer = torch.empty(2 * 7)
    lazy = LazyDirections(b"seed", sizes, 2, "cpu", buffer)
    assert len(lazy) == 3
    for j in (0, 1, 1, 2, 0):
        assert torch.equal(lazy[j], random_directions(b"seed", j, sizes[j], 2))
        assert lazy[j].data_ptr() == buffer.data_ptr()  # one buffer, the largest part's size
    assert lazy.draws == 4  # part 1 asked twice in a row is drawn once
    with pytest.raises(ValueError):
        LazyDirections(b"seed", sizes, 3, "cpu", buffer)


def test_scratch_views_share_one_buffer_grown_to_the_largest() -> None:
    from lightning_btard.ops.workspace import Workspace

    w = Workspace()
    a = w.view("rows", (3, 4), torch.float32, torch.device("cpu"))
    b = w.view("rows", (2, 5), torch.float32, torch.device("cpu"))
    assert a.data_ptr() == b.data_ptr() and b.shape == (2, 5)
    c = w.view("rows", (4, 5), torch.float32, torch.device("cpu"))
    assert c.shape == (4, 5) and w.view("rows", (3, 4), torch.float32, torch.device("cpu")).data_ptr() == c.data_ptr()


def test_directions_are_the_aes_ctr_stream_as_signed_integers_scaled_to_unit_variance() -> None:
    """An independent computation of the whole stream in one call (the implementation works in 1 MB chunks)."""
    import hashlib

    import numpy as np
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    k, size = 2, 300_001  # 600,002 coordinates: three chunks, the last partial
    key = hashlib.blake2b(b"seed" + (5).to_bytes(8, "little"), digest_size=16).digest()
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(4 * k * size))
    expected = np.frombuffer(stream, dtype="<i4").astype(np.float64) * (3**0.5 / 2**31)
    z = random_directions(b"seed", 5, size, k)
    np.testing.assert_allclose(z.double().numpy().reshape(-1), expected, rtol=2.5e-7, atol=0)  # two float32 roundings
    assert float(z.abs().max()) <= 3**0.5 and abs(float(z.double().var()) - 1.0) < 0.01
