"""BTARD on the hivemind backend: peers that start on their own (``python -m lightning_btard.swarm``), find each
other through the DHT, train the unchanged demo module, ban an attacker and end with identical parameters;
misconfigurations fail with one clear message."""

from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path

import pytest
from procs import ROOT, SCRIPTS, assert_identical, base_env, load_run, run_command

from datamodules import write_synthetic_cifar10
from lightning_btard.protocol.events import read_events


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return write_synthetic_cifar10(tmp_path_factory.mktemp("cifar"), n_train=1200, n_test=200, seed=0)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.timeout(500)
def test_independent_peers_ban_the_attacker_survive_a_crash_and_stay_identical(tmp_path, cifar) -> None:
    """4 peers: rank 2 flips signs from step 5 (banned by recomputation), rank 3 is killed (SIGKILL) at step 12; the
    others notice within the collective deadline, regroup without it, and finish with identical parameters."""
    # 34 steps: the attacker escapes its validators in steps 5-10 (2 of 4 peers: ~0.69 per step), in step 11 (checked by
    # the survivors of step 12's validators), and in steps 13-32 (2 of 3 peers) with probability ~4e-5 (22 steps: 2e-3)
    steps, crash, deadline = 34, 12, 15
    cmd = [
        sys.executable, "-m", "lightning_btard.swarm", "--peers", "4", "--byzantine", "2",
        "--attack-config", str(ROOT / "configs" / "attacks" / "sign_flipping.yaml"), "--attack-arg", "attack_start=5",
        "--run-dir", str(tmp_path / "run"), "--timeout", "400", "--",
        "--config", str(ROOT / "configs" / "demo.yaml"), f"--data.data_dir={cifar}", f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", f"--trainer.strategy.timeout={deadline}",
        "--trainer.strategy.validators=2",
        "--trainer.callbacks+=record_run.RecordRun", f"--trainer.callbacks.out_dir={tmp_path / 'rec'}",
        "--trainer.callbacks+=crash_at.CrashAt", "--trainer.callbacks.rank=3", f"--trainer.callbacks.step={crash}",
    ]
    env = base_env({"PYTHONPATH": os.pathsep.join([str(ROOT), str(SCRIPTS)])})
    out = run_command(cmd, timeout=450, env=env, cwd=tmp_path, check=False).stdout
    assert not _processes_mentioning(str(tmp_path / "run")), "the killed peer's DHT process or p2pd outlived the swarm"
    assert "rank 2 (attacker): banned at step" in out, out
    assert "rank 0: finished" in out and "rank 1: finished" in out, out
    assert "peer 3 exited with code -9; the others continue without it" in out, out
    assert f"BTARD: step {crash}: peer(s) [3] stopped answering" in out, out
    # each peer found the others from the first one's address and took the rank its key gives it
    for rank in range(4):
        log = (tmp_path / "run" / f"peer{rank}.log").read_text()
        assert f"4 peers joined; this peer is rank {rank}" in log
    params, metrics = load_run(tmp_path / "rec", 2)
    assert_identical(params)
    for m in metrics:
        assert m["global_step"] == steps
        assert [(b["peer"], b["evidence"]) for b in m["bans"]] == [(2, "recomputation")]
        assert 5 < m["bans"][0]["step"] < steps
        assert m["departed"] == {"3": crash}


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.timeout(500)
def test_a_late_peer_joins_with_the_groups_state_and_the_banned_attacker_is_refused(tmp_path, cifar) -> None:
    """3 peers start; rank 2 flips signs from step 0 and is banned by recomputation, then starts again with its own key
    and asks to join: the members refuse it. A fourth peer starts after the run did: it is admitted at a step
    boundary, downloads the model and optimizer state (checked against the members' digest), trains from that step,
    and ends with the others' parameters."""
    steps, join_every = 70, 5
    cmd = [
        sys.executable, "-m", "lightning_btard.swarm", "--peers", "3", "--byzantine", "2",
        "--attack-config", str(ROOT / "configs" / "attacks" / "sign_flipping.yaml"), "--attack-arg", "attack_start=0",
        "--late-peers", "1", "--late-delay", "0", "--rejoin-banned",
        "--run-dir", str(tmp_path / "run"), "--timeout", "400", "--",
        "--config", str(ROOT / "configs" / "demo.yaml"), f"--data.data_dir={cifar}", f"--trainer.max_steps={steps}",
        # logger and checkpoints on (the defaults): every peer, the joiner too, writes its own
        "--trainer.val_check_interval=35", "--trainer.enable_progress_bar=false",
        "--trainer.strategy.timeout=30", f"--trainer.strategy.join_every={join_every}",
        "--trainer.callbacks+=record_run.RecordRun", f"--trainer.callbacks.out_dir={tmp_path / 'rec'}",
        # the members wait at step 30 for both join requests (the late peer's, the banned peer's): no race between
        # the joiners' start-up and the members' 70 steps. The banned peer asks only once banned: attacking from step 0,
        # it escapes its validators (1 of 3 peers, ~0.73 per step) until step 30 with probability ~1e-4. At step 10 and
        # from step 2 that was 10%, and the members then waited out the 180 s timeout (this test took 227 s, not 50)
        "--trainer.callbacks+=wait_for_joiners.WaitForJoiners", "--trainer.callbacks.step=30", "--trainer.callbacks.count=2",
    ]
    env = base_env({"PYTHONPATH": os.pathsep.join([str(ROOT), str(SCRIPTS)])})
    out = run_command(cmd, timeout=450, env=env, cwd=tmp_path, check=False).stdout
    assert not _processes_mentioning(str(tmp_path / "run")), "a peer's DHT process or p2pd outlived the swarm"
    assert "rank 0: finished" in out and "rank 1: finished" in out, out
    assert re.search(r"rank 2 \(attacker\): banned at step \d+; asked to join again: refused \(banned at step \d+ as peer 2 "
                     r"\(recomputation\)\)", out), out
    joined = re.search(r"late peer 0: joined at step (\d+) as peer 3, finished", out)
    assert joined, out
    start = int(joined.group(1))
    assert start % join_every == 0 and 0 < start < steps
    for rank in (0, 1):  # every member recorded the admission in its event file
        admissions = [e for path in sorted((tmp_path / "run" / f"peer{rank}").glob("**/btard_events/*.jsonl"))
                      for e in read_events(str(path), "admission")]
        assert [(e["step"], e["peers"]) for e in admissions] == [(start, [3])], admissions
    params, metrics = load_run(tmp_path / "rec", [0, 1, 3])
    assert_identical(params)
    # review: peers other than rank 0 were second-class (no logs, no checkpoints): now each is its own rank zero
    for name in ("peer0", "peer1", "late0"):
        root = tmp_path / "run" / name
        assert list(root.glob("**/checkpoints/*.ckpt")), f"{name} saved no checkpoint"
        assert list(root.glob("**/metrics.csv")) or list(root.glob("**/events.out.tfevents*")), f"{name} logged nothing"
    for m in metrics:
        assert m["global_step"] == steps
        assert [(b["peer"], b["evidence"]) for b in m["bans"]] == [(2, "recomputation")]  # the joiner was told of it
    late = metrics[2]["losses"]
    assert late[0][0] == start + 1 and len(late) == steps - start  # from the group's step on (logged after each step)
    # the joiner ran the members' collectives in their order: none waited out its deadline (validation at step 35 and
    # 70 has a collective: a joiner counting one batch more once validated a step early, and everybody regrouped)
    logs = "".join((tmp_path / "run" / name).read_text() for name in ("peer0.log", "peer1.log", "late0.log"))
    assert "a collective failed" not in logs, logs[-3000:]


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.timeout(400)
def test_tiny_albert_runs_unchanged_on_independent_peers(tmp_path) -> None:
    """The ALBERT module and WikiText-103 datamodule of the torch-backend tests, between 3 hivemind peers (the data is
    prepared once first: peers on one machine would otherwise build the same cache at the same time)."""
    from datamodules import WikiText103DataModule

    data = tmp_path / "data"
    WikiText103DataModule(str(data), synthetic=True, train_tokenizer=True, tokenizer_vocab_size=1000, max_seq_length=64).prepare_data()
    steps = 12
    cmd = [
        sys.executable, "-m", "lightning_btard.swarm", "--peers", "3", "--run-dir", str(tmp_path / "run"), "--timeout", "300", "--",
        "--config", str(ROOT / "configs" / "albert_tiny.yaml"), f"--data.data_dir={data}", f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=12", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.callbacks+=record_run.RecordRun", f"--trainer.callbacks.out_dir={tmp_path / 'rec'}",
    ]
    env = base_env({"PYTHONPATH": os.pathsep.join([str(ROOT), str(SCRIPTS)])})
    out = run_command(cmd, timeout=360, env=env, cwd=tmp_path).stdout
    assert all(f"rank {r}: finished" in out for r in range(3)), out
    params, metrics = load_run(tmp_path / "rec", 3)
    assert_identical(params)
    for m in metrics:
        assert m["global_step"] == steps and m["bans"] == [] and m["metrics"]["val/loss"] < 8.0


def test_hivemind_backend_needs_one_device_per_process_and_a_group_size() -> None:
    from lightning_btard import BTARDStrategy
    from lightning_btard.errors import UserError
    from lightning_btard.lightning_package import pl

    with pytest.raises(UserError, match="needs num_peers"):
        BTARDStrategy(backend="hivemind")
    with pytest.raises(UserError, match="one device per process"):
        pl.Trainer(accelerator="cpu", devices=2, strategy=BTARDStrategy(backend="hivemind", num_peers=2))
    with pytest.raises(UserError, match="backend='torch' or backend='hivemind'"):
        BTARDStrategy(backend="grpc")


def test_rendezvous_orders_the_group_by_peer_id_and_reports_missing_peers(hivemind_swarm) -> None:
    from lightning_btard.errors import UserError
    from lightning_btard.groups.hivemind_rendezvous import rank_order, rendezvous

    nodes = hivemind_swarm.nodes[:3]
    run_id = f"test-{os.urandom(4).hex()}"
    groups: list = [None] * 3

    def join(i: int) -> None:
        groups[i] = rendezvous(nodes[i], run_id, 3, timeout=60, poll_interval=0.05)

    threads = [threading.Thread(target=join, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    expected = rank_order([n.peer_id for n in nodes])
    for i, transport in enumerate(groups):
        assert transport is not None and transport.members == expected
        assert transport.rank == expected.index(nodes[i].peer_id)
        assert len(transport.salt) == 16 and transport.salt == groups[0].salt
        transport.close()

    # the same peers start the same run_id again (a restart, within the records' life): a fresh salt, so a fresh
    # session for everything; before, the restarted run derived the old run's sessions and read its board records
    first = [t.salt for t in groups]
    first_session = groups[0].session
    threads = [threading.Thread(target=join, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert all(t is not None and t.salt == groups[0].salt and t.salt != first[0] for t in groups)
    assert len({t.session for t in groups}) == 1 and groups[0].session != first_session
    for t in groups:
        t.close()

    with pytest.raises(UserError, match="only 1 of 2 peers joined"):
        rendezvous(hivemind_swarm.nodes[3], f"alone-{os.urandom(4).hex()}", 2, timeout=2, poll_interval=0.1)
    with pytest.raises(UserError, match="another run uses this run_id"):
        rendezvous(hivemind_swarm.nodes[4], run_id, 3, timeout=5, poll_interval=0.1)  # a fourth peer for a run of three


def test_a_drawn_order_is_the_same_everywhere_chosen_by_nobody_and_on_the_chain(hivemind_swarm) -> None:
    """Review: ranks were peer-id order, which anyone can grind for (identities cost ~76 ms). With shuffle_ranks (the
    default) the group is reordered by a commit-reveal draw every member takes part in; every member derives the same
    order, the transport follows it, and the change is a link of the chain that joiners verify."""
    from lightning_btard.groups.hivemind import HivemindGroup
    from lightning_btard.groups.hivemind_chain import verify_chain
    from lightning_btard.groups.hivemind_rendezvous import rendezvous
    from lightning_btard.protocol.digest import digest
    from lightning_btard.protocol.membership import Membership
    from lightning_btard.protocol.mprng import draw

    nodes = hivemind_swarm.nodes[:3]
    run_id = f"test-{os.urandom(4).hex()}"
    out: list = [None] * 3

    def member(i: int) -> None:
        t = rendezvous(nodes[i], run_id, 3, timeout=60, poll_interval=0.05)
        group = HivemindGroup(nodes[i], run_id, t.members, Membership(peers=[0, 1, 2]), t.rank, 30.0, t, salt=t.salt,
                              chain=t.chain)
        value = draw(group.transport, "ranks")
        order = group.reorder(value)
        out[i] = (value, order, list(group.members), group.peer, group.transport.all_gather_object(group.peer), group)

    threads = [threading.Thread(target=member, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    value, order, members, _, board, _ = out[0]
    assert all(o[0] == value and o[1] == order and o[2] == members for o in out)
    assert members == sorted(members, key=lambda p: digest(value, p.to_bytes()))
    assert board == [0, 1, 2] and sorted(o[3] for o in out) == [0, 1, 2]
    assert all(members[o[3]] == nodes[i].peer_id for i, o in enumerate(out))
    chain = out[0][5].chain
    assert chain.collect(nodes[0])  # every member signed the reorder
    verified = verify_chain(chain.to_record(), run_id, (), chain.links[0].digest)
    assert verified.head.members == [m.to_base58() for m in members]
    for o in out:
        o[5].close()
