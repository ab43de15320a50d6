"""The swarm soak's short version (``benchmarks/swarm_soak.py``; the long one is ``./run bench swarm_soak``): 5 loopback
peers with a sign flipper, a withholder, a peer killed and restarted, a late joiner and a Sybil that asks to join and
never takes part. Honest peers are never banned and end identical; the flipper is banned, the withholder removed, the
Sybil, once admitted, lost at the next collective (refused after twice: the long soak shows it); no process outlives
the run."""

from __future__ import annotations

import json
import os
import sys

import pytest
from procs import ROOT, base_env, run_command
from test_hivemind_training import _processes_mentioning


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.timeout(700)
def test_a_short_soak_keeps_honest_peers_identical_under_churn_and_attacks(tmp_path) -> None:
    run_dir = tmp_path / "soak"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "swarm_soak.py"), "--peers", "5", "--minutes", "1", "--sybils", "1",
           "--crash-at", "5", "--withhold-at", "12", "--collective-timeout", "8", "--late-after", "15", "--validators", "2", "--join-every", "2",
           "--run-dir", str(run_dir)]
    env = base_env({"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "scripts"), str(ROOT / "benchmarks")])})
    out = run_command(cmd, timeout=650, env=env, cwd=tmp_path, check=False).stdout
    assert not _processes_mentioning(str(run_dir)), "a peer's DHT process or p2pd outlived the soak"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert all(summary["checks"].values()), out
    assert [p for _, p, _ in summary["bans"]] == [summary["flipper"]], out
    assert any(summary["withholder"] in peers for _, peers in summary["departures"]), out
    assert {"peer1.restart", "late0"} <= set(summary["joined"]), out
    sybils = {p for _, peers in summary["joins"] for p in peers} - set(summary["joined"].values())
    assert sybils and all(any(s in peers for _, peers in summary["departures"]) for s in sybils), out  # admitted, lost
