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
