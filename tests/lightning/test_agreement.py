"""Before the first step peers agree on their training data (by majority, from fingerprints): peers whose data differ
never get to accuse each other. Lightning's BoringModel with seed_everything(rank) is the case a new user hits."""

from __future__ import annotations

import pytest
from procs import assert_identical, load_run, run_script


@pytest.mark.timeout(300)
@pytest.mark.parametrize("devices", [2, 4])
def test_peers_whose_data_differ_stop_with_a_clear_error_before_any_ban(tmp_path, devices: int) -> None:
    out = run_script("boring.py", [str(tmp_path), "--devices", str(devices), "--seed-per-rank"], timeout=240, check=False)
    assert out.returncode != 0
    assert "training data differ and no majority of them agrees" in out.stdout, out.stdout[-3000:]
    assert "seed_everything(<the same seed>)" in out.stdout
    assert "banned" not in out.stdout


@pytest.mark.timeout(300)
def test_the_same_model_seeded_alike_trains_identically(tmp_path) -> None:
    run_script("boring.py", [str(tmp_path), "--devices", "2"], timeout=240)
    params, metrics = load_run(tmp_path, 2)
    assert_identical(params)
    assert all(m["bans"] == [] and m["global_step"] == 6 for m in metrics)


def test_the_start_is_the_majoritys_and_a_source_that_lies_about_it_is_named() -> None:
    """Review: member 0 sent the initial state and could send each peer a different one. Now peers that started from
    the majority's state keep it; the others take it from a member that announced it and check its digest: member 0
    announces the majority's digest, then sends junk. Peer 1 (started alike) keeps its own; peer 2 (started
    differently) names member 0. On hivemind, no majority at all is an error (no member gets to choose)."""
    from types import SimpleNamespace

    import torch
    from peers import run_peers

    from lightning_btard.errors import UserError
    from lightning_btard.protocol.digest import tensors_digest
    from lightning_btard.strategy import BTARDStrategy

    def model(seed: int) -> torch.nn.Module:  # a local generator: peers are threads sharing torch's global one
        m, g = torch.nn.Linear(3, 2), torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        return m

    honest = model(0)

    def peer(t):
        m = model(0 if t.rank < 2 else 5)
        if t.rank == 0:  # announces the majority's digest, sends junk
            t.all_gather_object(tensors_digest(list(m.parameters()) + list(m.buffers())))
            for p in m.parameters():
                t.broadcast_tensor_(torch.full_like(p.data, 7.0), src=0)
            return None
        fake = SimpleNamespace(model=m, transport=t, _hivemind=None)
        try:
            BTARDStrategy._broadcast_module_state(fake)  # type: ignore[arg-type]
        except UserError as e:
            return str(e)
        return [p.detach().clone() for p in m.parameters()]

    out = run_peers(3, peer)
    assert all(torch.equal(a, b) for a, b in zip(out[1], honest.parameters()))
    assert isinstance(out[2], str) and "member 0 announced the state a majority" in out[2]

    def unseeded(t):
        fake = SimpleNamespace(model=model(t.rank), transport=t, _hivemind=object())
        try:
            BTARDStrategy._broadcast_module_state(fake)  # type: ignore[arg-type]
        except UserError as e:
            return str(e)

    assert all("same seed" in r for r in run_peers(3, unseeded))
