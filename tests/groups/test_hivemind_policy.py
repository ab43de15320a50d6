"""Who may join a hivemind run and how fast (``groups/hivemind_policy.py``): allow-lists (and the peers they tie),
caps on joins per admission and per window, a flood of requests, a banned peer back under a new identity with its old
signing key. The policy's arithmetic is checked alone; its place in the rendezvous and the admission on a swarm."""

from __future__ import annotations

import os
import threading

import pytest
from hivemind.p2p import PeerID

from lightning_btard.errors import UserError
from lightning_btard.groups import hivemind_admission
from lightning_btard.groups.hivemind_admission import JoinRequest, agree_on_joiners, ask_to_join
from lightning_btard.groups.hivemind_policy import MAX_LISTED, AdmissionPolicy, order_key, read_allow_list
from lightning_btard.transports.codec import encode_record
from lightning_btard.transports.hivemind_keys import rendezvous_key as key

pytestmark = pytest.mark.timeout(180)


def _fake_peer() -> PeerID:
    return PeerID(b"\x12\x20" + os.urandom(32))


def test_the_allow_list_reads_files_and_lists_and_ties_owners(tmp_path) -> None:
    a, b, c = (_fake_peer().to_base58() for _ in range(3))
    path = tmp_path / "allowed.txt"
    path.write_text(f"# the run's peers\n{a} alice\n\n/ip4/10.0.0.1/tcp/1/p2p/{b} alice  # a second machine\n{c}\n")
    allowed = read_allow_list(str(path))
    assert allowed == {a: "alice", b: "alice", c: c}
    policy = AdmissionPolicy(allowed)
    assert policy.allows(c) and not policy.allows(_fake_peer().to_base58())
    assert policy.tied([a]) == {a, b} and policy.tied([c]) == {c}
    assert read_allow_list([a, f"{b} bob"]) == {a: a, b: "bob"} and read_allow_list(None) is None
    assert AdmissionPolicy().tied([a]) == {a} and AdmissionPolicy().allows(a)
    for bad, match in ((str(tmp_path / "none.txt"), "no file"), (["not-a-peer"], "not a peer id"), ([], "empty"),
                       ([f"{a} x y"], "expected")):
        with pytest.raises(UserError, match=match):
            read_allow_list(bad)
    with pytest.raises(UserError, match="max_joins_per_step must be >= 1"):
        AdmissionPolicy(max_joins_per_step=0)


def test_caps_per_admission_and_per_window_in_an_order_nobody_chooses() -> None:
    policy = AdmissionPolicy(max_joins_per_step=2, max_joins_per_window=3, join_window=100)
    requests = [JoinRequest(_fake_peer(), b"k" * 32, os.urandom(16)) for _ in range(10)]
    first = policy.choose(requests, b"salt", 10)
    assert first == sorted(requests, key=lambda r: order_key(b"salt", 10, r.peer.to_base58()))[:2]
    assert policy.choose(list(reversed(requests)), b"salt", 10) == first  # the order of arrival does not matter
    assert policy.choose(requests, b"other salt", 10) != first or len(requests) < 3  # the salt does
    policy.record(10, 2)
    assert len(policy.choose(requests, b"salt", 20)) == 1  # 3 per window: one more
    policy.record(20, 1)
    assert policy.choose(requests, b"salt", 30) == [] and policy.room(109) == 0
    assert policy.room(110) == 2  # the window (10, 110] slides past the two joins of step 10
    many = [JoinRequest(_fake_peer(), b"k" * 32, os.urandom(16)) for _ in range(3 * MAX_LISTED)]
    assert len(policy.listed(many, b"salt", 5)) == MAX_LISTED


def test_a_flood_of_requests_admits_one_per_step_and_the_collective_stays_bounded(hivemind_swarm, monkeypatch) -> None:
    """200 Sybil requests (as the DHT would return them) and the real one: each member lists at most MAX_LISTED, the
    same ones (the order is the salt's, not the requester's), and one peer is admitted, the same on every member."""
    run_id, nodes = f"test-flood-{os.urandom(4).hex()}", hivemind_swarm.nodes
    flood = [JoinRequest(_fake_peer(), os.urandom(32), os.urandom(16)) for _ in range(200)]
    real = hivemind_admission._join_requests
    monkeypatch.setattr(hivemind_admission, "_join_requests", lambda node, run: flood + real(node, run))
    ask_to_join(nodes[3], run_id, b"k" * 32)
    group = [n.peer_id for n in nodes[:3]]
    sizes = []
    gather = hivemind_admission.HivemindTransport.all_gather_object

    def measured(self, obj):
        sizes.append(len(obj))
        return gather(self, obj)

    monkeypatch.setattr(hivemind_admission.HivemindTransport, "all_gather_object", measured)
    out = hivemind_swarm.run(3, lambda t: agree_on_joiners(t, run_id, group, [], policy=AdmissionPolicy(), salt=b"s", step=7))
    assert all(len(admitted) == 1 and admitted == out[0][0] for admitted, _ in out)
    assert max(sizes) == MAX_LISTED


def test_a_banned_peer_is_refused_with_its_tied_peers_and_under_a_new_id_with_its_old_key(hivemind_swarm) -> None:
    nodes = hivemind_swarm.nodes
    run_id = f"test-ban-{os.urandom(4).hex()}"
    banned, tied = nodes[3], nodes[4]
    allowed = {n.peer_id.to_base58(): str(i) for i, n in enumerate(nodes[:3])}
    allowed |= {banned.peer_id.to_base58(): "mallory", tied.peer_id.to_base58(): "mallory"}
    ask_to_join(tied, run_id, b"t" * 32)
    group = [n.peer_id for n in nodes[:3]]
    out = hivemind_swarm.run(3, lambda t: agree_on_joiners(t, run_id, group, [banned.peer_id], policy=AdmissionPolicy(allowed)))
    assert all(admitted == [] and refused == [tied.peer_id] for admitted, refused in out)
    # an open run: the tie is gone, but the banned member's signing key, under a new peer id, is refused
    run_id = f"test-key-{os.urandom(4).hex()}"
    ask_to_join(tied, run_id, b"B" * 32)
    out = hivemind_swarm.run(3, lambda t: agree_on_joiners(t, run_id, group, [banned.peer_id], banned_keys=[b"B" * 32]))
    assert all(admitted == [] and refused == [tied.peer_id] for admitted, refused in out)
    out = hivemind_swarm.run(3, lambda t: agree_on_joiners(t, run_id, group, [banned.peer_id]))
    assert all([r.peer for r in admitted] == [tied.peer_id] for admitted, _ in out)  # the same request, key not banned


def test_with_an_allow_list_nobody_else_takes_a_place_at_the_rendezvous(hivemind_swarm) -> None:
    """Node 3 (not allowed) announces the same run: without an allow-list the run cannot start (4 announced for 3);
    with one, nodes 0-2 form the group and node 3 is told it is not on the list."""
    from lightning_btard.groups.hivemind_rendezvous import rendezvous

    nodes = hivemind_swarm.nodes
    run_id = f"test-allow-{os.urandom(4).hex()}"
    allowed = {n.peer_id.to_base58() for n in nodes[:3]}
    with pytest.raises(UserError, match="not on run .* allow-list"):
        rendezvous(nodes[3], run_id, 3, timeout=5, allowed=allowed)
    assert nodes[3].store(key(run_id), encode_record({"run": run_id, "nonce": os.urandom(16)}), 600)
    groups: list = [None] * 3

    def join(i: int) -> None:
        groups[i] = rendezvous(nodes[i], run_id, 3, timeout=60, poll_interval=0.05, allowed=allowed)

    threads = [threading.Thread(target=join, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert all(g is not None and set(g.members) == {n.peer_id for n in nodes[:3]} for g in groups)
    for g in groups:
        g.close()
    with pytest.raises(UserError, match="another run uses this run_id"):
        rendezvous(nodes[0], run_id, 3, timeout=10, poll_interval=0.05)
