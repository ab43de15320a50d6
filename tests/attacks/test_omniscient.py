"""Attacks with full knowledge (IPM and ALIE with omniscient=True, MinMax, MinSum, Mimic): their formulas against
independent computations, and the knowledge itself (every peer's gradient, handed over in-process)."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peers import run_peers

from lightning_btard.attacks import ALittleIsEnough, InnerProductManipulation, Mimic, MinMax, MinSum
from lightning_btard.attacks.base import AttackContext
from lightning_btard.attacks.min_max import max_gamma, perturbation
from lightning_btard.attacks.roster import give_colluders_a_channel


def sent_by_every_peer(attack, grads: torch.Tensor, step: int = 5) -> list[torch.Tensor]:
    """What each of the ``n`` peers sends when ``attack`` runs on all of them (the strategy's wiring, in-process)."""
    n = grads.shape[0]

    def peer(t):
        attack_copy = type(attack).__new__(type(attack))
        attack_copy.__dict__.update({k: v for k, v in attack.__dict__.items()})
        give_colluders_a_channel([attack_copy], t, list(range(n)))  # as the strategy does, on every peer
        ctx = AttackContext(step=step, rank=t.rank, world_size=n)
        return attack_copy.on_before_aggregate(grads[t.rank].clone(), ctx)

    return run_peers(n, peer)


def grads_of(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + torch.linspace(-1, 1, d, dtype=torch.float64)


def test_omniscient_ipm_and_alie_use_the_honest_gradients() -> None:
    n, byz = 7, [2, 5]
    grads = grads_of(n, 30, 0)
    honest = grads[[i for i in range(n) if i not in byz]].numpy()
    ipm = sent_by_every_peer(InnerProductManipulation(byz, epsilon=0.5, omniscient=True), grads)
    alie = sent_by_every_peer(ALittleIsEnough(byz, omniscient=True), grads)
    s = int(np.floor(n / 2 + 1)) - len(byz)
    z = NormalDist().inv_cdf((n - s) / n)
    for r in range(n):
        if r in byz:
            assert np.allclose(ipm[r].numpy(), -0.5 * honest.mean(axis=0))
            assert np.allclose(alie[r].numpy(), honest.mean(axis=0) - z * honest.std(axis=0, ddof=1))
        else:
            assert torch.equal(ipm[r], grads[r]) and torch.equal(alie[r], grads[r])  # honest peers send their own
    # not omniscient: the colluders' own gradients, as before
    plain = sent_by_every_peer(InnerProductManipulation(byz, epsilon=0.5), grads)
    assert np.allclose(plain[2].numpy(), -0.5 * grads[byz].numpy().mean(axis=0))


def papers_gamma(honest: np.ndarray, p: np.ndarray, rule: str) -> float:
    """The papers' search for the largest gamma within the bound, by bisection on the feasibility test itself
    (numpy, no quadratics): gamma = 0 is feasible (the mean is within the honest spread) and feasibility is an
    interval (each bound is convex in gamma)."""
    mu = honest.mean(axis=0)
    dists = np.linalg.norm(honest[:, None] - honest[None], axis=2)

    def ok(g: float) -> bool:
        m = mu + g * p
        if rule == "min_max":
            return np.linalg.norm(honest - m, axis=1).max() <= dists.max()
        return (np.linalg.norm(honest - m, axis=1) ** 2).sum() <= (dists ** 2).sum(axis=1).max()

    lo, hi = 0.0, 1.0
    while ok(hi):
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 9), st.integers(1, 12), st.integers(0, 1000), st.sampled_from(["std", "unit", "sign"]),
       st.sampled_from(["min_max", "min_sum"]))
def test_min_max_and_min_sum_gamma_is_the_largest_within_the_bound(h: int, d: int, seed: int, kind: str, rule: str) -> None:
    honest = grads_of(h, d, seed)
    p = perturbation(honest, kind)
    gamma = max_gamma(honest, p, rule)  # type: ignore[arg-type]
    a, pn = honest.numpy(), p.numpy()
    expected = papers_gamma(a, pn, rule)
    assert gamma == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_min_max_and_min_sum_send_the_mean_pushed_along_the_perturbation() -> None:
    n, byz = 8, [1, 4, 6]
    grads = grads_of(n, 20, 3)
    honest = grads[[i for i in range(n) if i not in byz]]
    for cls, rule in ((MinMax, "min_max"), (MinSum, "min_sum")):
        sent = sent_by_every_peer(cls(byz, perturbation="std"), grads)
        std = honest.numpy().std(axis=0, ddof=1)
        gamma = papers_gamma(honest.numpy(), -std, rule)
        for r in byz:
            assert np.allclose(sent[r].numpy(), honest.numpy().mean(axis=0) - gamma * std, atol=1e-6)
        assert all(torch.equal(sent[r], grads[r]) for r in range(n) if r not in byz)


def test_mimic_copies_the_honest_peer_farthest_along_the_top_principal_direction() -> None:
    n, byz = 6, [0, 3]
    grads = grads_of(n, 40, 9)
    honest_ids = [i for i in range(n) if i not in byz]
    grads[honest_ids[2]] += 4.0 * torch.linspace(0, 1, 40, dtype=torch.float64)  # one peer stands out
    centered = grads[honest_ids].numpy() - grads[honest_ids].numpy().mean(axis=0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    proj = centered @ vt[0]
    proj = proj if proj.max() >= -proj.min() else -proj
    expected = honest_ids[int(np.argmax(proj))]
    assert expected == honest_ids[2]
    sent = sent_by_every_peer(Mimic(byz), grads)
    for r in byz:
        assert torch.equal(sent[r], grads[expected])
