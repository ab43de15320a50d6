"""Joining a running group on the hivemind backend: what a majority of members saw is admitted, banned peers are
refused, a joiner believes only records a majority of the group wrote identically, and loads only a state whose
digest is the agreed one. (End to end, with real peers: test_hivemind_training.py.)"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hivemind.p2p import PeerID

from lightning_btard.errors import UserError
from lightning_btard.groups.hivemind_admission import (
    JoinRequest,
    Refused,
    agree_on_joiners,
    announce_finished,
    announce_running,
    ask_to_join,
    download_agreed_state,
    publish_admission,
    publish_refusal,
    wait_for_admission,
)
from lightning_btard.groups.hivemind_chain import GroupChain
from lightning_btard.groups.hivemind_state import shared_state_digest, to_plain
from lightning_btard.transports.codec import decode_record, encode_record

pytestmark = pytest.mark.timeout(180)


def _run_id() -> str:
    return f"test-join-{os.urandom(4).hex()}"


def test_members_admit_what_a_majority_saw_and_refuse_banned_peers(hivemind_swarm) -> None:
    """Nodes 0-2 are the group, 3 asks to join, 4 (banned) asks too; member 0 is Byzantine: it lists a peer nobody
    asked for and leaves out the real joiner. Neither changes what the honest members decide."""
    run_id, nodes = _run_id(), hivemind_swarm.nodes
    ask_to_join(nodes[3], run_id, b"k" * 32)
    ask_to_join(nodes[4], run_id, b"b" * 32)
    group = [n.peer_id for n in nodes[:3]]
    fake = [PeerID(b"\x12\x20" + os.urandom(32)).to_base58(), b"f" * 32, b"n" * 16]  # a well-formed peer id

    def member(t):
        if t.rank == 0:
            return t.all_gather_object([fake])  # the same single collective agree_on_joiners runs
        return agree_on_joiners(t, run_id, group, banned=[nodes[4].peer_id])

    out = hivemind_swarm.run(3, member)
    for admitted, refused in out[1:]:
        assert [(r.peer, r.key) for r in admitted] == [(nodes[3].peer_id, b"k" * 32)]
        assert refused == [nodes[4].peer_id]
    # once admitted, a request is not admitted again (its peer may have joined and left since)
    nonce = out[1][0][0].nonce
    again = hivemind_swarm.run(3, lambda t: agree_on_joiners(t, run_id, group, [nodes[4].peer_id], admitted_before=[nonce]))
    assert all(admitted == [] for admitted, _ in again)


def _record(group, digest: bytes, chain: GroupChain, peer_id: int = 3) -> dict:
    return {"step": 10, "group": [g.to_base58() for g in group], "peers": [], "keys": [], "seed": 1, "generation": 1,
            "bans": [], "departed": [], "digest": digest, "id": peer_id, "chain": chain.to_record()}


def _genesis(run_id: str, signers) -> GroupChain:
    """The first group of a run of ``signers`` (nodes), signed by each, as the rendezvous makes it."""
    chain = GroupChain.genesis(run_id, b"s" * 16, [n.peer_id for n in signers], b"r" * 16)
    for node in signers:
        chain.sign(node, 0)
    return chain


def _asking(nodes, asker, key: bytes) -> tuple[str, list, bytes, GroupChain]:
    """A run of nodes 0-2, marked as running, and ``asker``'s request to join it: run id, group, nonce, chain."""
    run_id, group = _run_id(), [n.peer_id for n in nodes[:3]]
    chain = _genesis(run_id, nodes[:3])
    for node in nodes[:3]:
        announce_running(node, run_id, 0, chain.links[0].digest)
    return run_id, group, ask_to_join(asker, run_id, key), chain


@pytest.mark.parametrize("view", [[[[1], b"k" * 32, b"n" * 16]], [[torch.zeros(2), b"k", b"n"]], [1], "x", [[None] * 3]])
def test_an_ill_typed_join_view_is_ignored_not_a_crash(hivemind_swarm, view) -> None:
    """A Byzantine member's view of the join requests with values of the wrong types (a list where a peer id is: it
    was unhashable and crashed every member) counts for nothing."""
    run_id, nodes = _run_id(), hivemind_swarm.nodes
    ask_to_join(nodes[3], run_id, b"k" * 32)
    group = [n.peer_id for n in nodes[:3]]

    def member(t):
        if t.rank == 0:
            return t.all_gather_object(view)
        return agree_on_joiners(t, run_id, group, banned=[])

    out = hivemind_swarm.run(3, member)
    for admitted, _ in out[1:]:
        assert [r.peer for r in admitted] == [nodes[3].peer_id]


def test_a_joiner_believes_only_what_a_majority_of_the_group_wrote(hivemind_swarm) -> None:
    nodes = hivemind_swarm.nodes
    joiner = nodes[3]
    run_id, group, nonce, chain = _asking(nodes, joiner, b"k" * 32)
    request = JoinRequest(joiner.peer_id, b"k" * 32, nonce)
    # a Byzantine member alone: not enough
    publish_admission(nodes[0], run_id, request, _record(group, b"forged", chain), timeout=10)
    with pytest.raises(UserError, match="did not admit this peer"):
        wait_for_admission(joiner, run_id, nonce, timeout=2, poll_interval=0.2)
    # two honest members of three write the same record: that one counts, the forged one does not
    for node in nodes[1:3]:
        publish_admission(node, run_id, request, _record(group, b"honest", chain), timeout=10)
    record, verified = wait_for_admission(joiner, run_id, nonce, timeout=20, poll_interval=0.2)
    assert record["digest"] == b"honest" and verified.head.members == [g.to_base58() for g in group]
    # a later attempt of the same peer does not take the earlier attempt's admission
    again = ask_to_join(joiner, run_id, b"k" * 32)
    with pytest.raises(UserError, match="did not admit this peer"):
        wait_for_admission(joiner, run_id, again, timeout=2, poll_interval=0.2)


def test_a_banned_peer_is_told_why_when_a_majority_refuses_it(hivemind_swarm) -> None:
    nodes = hivemind_swarm.nodes
    banned = nodes[4]
    run_id, group, nonce, chain = _asking(nodes, banned, b"b" * 32)
    publish_refusal(nodes[0], run_id, banned.peer_id, group, "banned at step 7 as peer 2 (recomputation)", timeout=10, chain=chain)
    with pytest.raises(UserError, match="did not admit this peer"):  # one member of three refusing is not the group
        wait_for_admission(banned, run_id, nonce, timeout=2, poll_interval=0.2)
    publish_refusal(nodes[1], run_id, banned.peer_id, group, "banned at step 7 as peer 2 (recomputation)", timeout=10, chain=chain)
    with pytest.raises(Refused, match=r"refused this peer .*banned at step 7 as peer 2 \(recomputation\)"):
        wait_for_admission(banned, run_id, nonce, timeout=20, poll_interval=0.2)


def _checkpoint(weight: float = 1.0, buffer: float = 0.0, momentum: float = 0.5, dirpath: str = "/a") -> dict:
    """A checkpoint dict shaped like Lightning's (OrderedDict state_dict, int-keyed optimizer state, tuples, paths)."""
    return {
        "epoch": 0, "global_step": 5, "pytorch-lightning_version": "2.6.6",
        "state_dict": OrderedDict([("w", torch.full((3, 2), weight)), ("bn.running_mean", torch.full((2,), buffer)),
                                   ("bn.num_batches_tracked", torch.tensor(5))]),
        "loops": {"fit_loop": {"epoch_loop.batch_progress": {"total": {"ready": 6, "completed": 5}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"dirpath": Path(dirpath), "best_model_score": None}},
        "optimizer_states": [{"state": {0: {"momentum_buffer": torch.full((3, 2), momentum), "step": torch.tensor(5.0)}},
                              "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "foreach": None, "params": [0]}]}],
        "lr_schedulers": [{"last_epoch": 5, "_last_lr": [0.1]}],
        "MixedPrecision": {"scale": 1024.0},
    }


def _digest(checkpoint: dict) -> bytes:
    return shared_state_digest(checkpoint, ["w"], "MixedPrecision")


def test_the_state_digest_covers_what_members_share_and_nothing_else() -> None:
    base = _digest(_checkpoint())
    assert _digest(_checkpoint(buffer=3.0, dirpath="/elsewhere")) == base  # each member's own buffers and callbacks
    assert _digest(_checkpoint(weight=1.0 + 1e-7)) != base
    assert _digest(_checkpoint(momentum=0.25)) != base
    other_scale = _checkpoint()
    other_scale["MixedPrecision"]["scale"] = 2.0
    assert _digest(other_scale) != base
    with pytest.raises(TypeError, match=r"checkpoint\['callbacks'\]\['x'\]: a object cannot be sent"):
        to_plain({"callbacks": {"x": object()}})


def test_the_joiner_takes_only_the_state_with_the_agreed_digest(hivemind_swarm) -> None:
    """Member 0 offers a tampered model, member 1 the honest one, member 2 nothing for this step."""
    nodes, states = hivemind_swarm.nodes, hivemind_swarm.states
    honest, tampered = _checkpoint(buffer=2.0), _checkpoint(weight=-1.0)
    states[0].offer(5, encode_record(to_plain(tampered)))
    states[1].offer(5, encode_record(to_plain(honest)))
    states[2].offer(4, encode_record(to_plain(honest)))
    agreed = _digest(honest)
    try:
        for _ in range(3):  # the sources are tried in a random order
            got, source = download_agreed_state(
                nodes[3], [n.peer_id for n in nodes[:3]], 5, lambda c: _digest(c) == agreed, timeout=20
            )
            assert source == nodes[1].peer_id
            assert torch.equal(got["state_dict"]["w"], honest["state_dict"]["w"])
            assert torch.equal(got["state_dict"]["bn.running_mean"], torch.full((2,), 2.0))  # the server's own buffers
            assert got["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.99)
            assert got["callbacks"]["ModelCheckpoint{'monitor': None}"]["dirpath"] == "/a"
            assert got["state_dict"]["bn.num_batches_tracked"].shape == ()
        states[1].withdraw()
        with pytest.raises(Exception, match="no member sent the agreed state of step 5"):
            download_agreed_state(nodes[3], [n.peer_id for n in nodes[:3]], 5, lambda c: _digest(c) == agreed, timeout=20)
    finally:
        for offers in states[:3]:
            offers.withdraw()


def test_a_joiner_moves_on_from_a_state_too_large_or_unreadable(hivemind_swarm) -> None:
    """Member 0 offers a state larger than the joiner's cap, member 1 a record the digest check cannot read (it
    raised in the joiner before: the joiner died), member 2 the honest one: the joiner takes member 2's."""
    nodes, states = hivemind_swarm.nodes, hivemind_swarm.states
    honest = _checkpoint()
    data = encode_record(to_plain(honest))
    states[0].offer(5, encode_record(to_plain(_checkpoint())) + b"\0" * 4096)  # announced size over the cap
    states[1].offer(5, encode_record({"state_dict": [1, 2, 3]}))  # a dict the digest check chokes on
    states[2].offer(5, data)
    agreed = _digest(honest)
    try:
        for _ in range(3):  # the sources are tried in a random order
            got, source = download_agreed_state(nodes[3], [n.peer_id for n in nodes[:3]], 5,
                                                lambda c: _digest(c) == agreed, timeout=20, max_bytes=len(data) + 100)
            assert source == nodes[2].peer_id
            assert torch.equal(got["state_dict"]["w"], honest["state_dict"]["w"])
    finally:
        for offers in states[:3]:
            offers.withdraw()


def test_the_state_size_cap_follows_the_joiners_model() -> None:
    from lightning_btard.hivemind_peer import state_size_cap

    model = torch.nn.Linear(1000, 1000)  # 4 MB of parameters
    assert state_size_cap(model) == 6 * 4 * (1000 * 1000 + 1000) + 2**26


def test_a_checkpoint_travels_as_plain_data() -> None:
    checkpoint = _checkpoint()
    decoded = decode_record(encode_record(to_plain(checkpoint)), strict=True)
    assert _digest(decoded) == _digest(checkpoint)
    assert decoded["optimizer_states"][0]["state"][0]["step"].item() == 5.0


def test_a_joiner_is_told_when_the_run_has_ended(hivemind_swarm) -> None:
    from lightning_btard.groups.hivemind_admission import run_is_running

    run_id, nodes = _run_id(), hivemind_swarm.nodes
    assert not run_is_running(nodes[3], run_id)
    for node in nodes[:2]:
        announce_running(node, run_id, 0, _genesis(run_id, nodes[:2]).links[0].digest)
    assert run_is_running(nodes[3], run_id)
    announce_finished(nodes[0], run_id, 40)
    assert run_is_running(nodes[3], run_id)  # one member still trains
    announce_finished(nodes[1], run_id, 40)
    assert not run_is_running(nodes[3], run_id)
    with pytest.raises(UserError, match="ended before its members admitted this peer"):
        wait_for_admission(nodes[3], run_id, ask_to_join(nodes[3], run_id, b"k" * 32), timeout=30, poll_interval=0.1)


def test_an_outsider_cannot_name_a_group_of_its_own_to_a_joiner(hivemind_swarm) -> None:
    """Review: a joiner accepted an admission record when a majority of "the group it names" wrote it, and the writer
    chose that group: node 4, no member, wrote a record naming only itself and got the joiner to take its keys, seed
    and state. Now the group must be the head of a chain from the run's first group: node 4's own genesis is not it."""
    nodes = hivemind_swarm.nodes
    joiner, outsider = nodes[3], nodes[4]
    run_id, group, nonce, chain = _asking(nodes, joiner, b"k" * 32)
    request = JoinRequest(joiner.peer_id, b"k" * 32, nonce)
    own = _genesis(run_id, [outsider])  # a first group of its own, signed by all of its (one) members
    publish_admission(outsider, run_id, request, _record([outsider.peer_id], b"mine", own), timeout=10)
    with pytest.raises(UserError, match="did not admit this peer"):
        wait_for_admission(joiner, run_id, nonce, timeout=3, poll_interval=0.2)
    # the outsider copies the genuine chain but names itself as the group: the chain's head is not its group
    publish_admission(outsider, run_id, request, {**_record([outsider.peer_id], b"mine", chain)}, timeout=10)
    with pytest.raises(UserError, match="did not admit this peer"):
        wait_for_admission(joiner, run_id, nonce, timeout=3, poll_interval=0.2)
    for node in nodes[1:3]:  # the members, as before
        publish_admission(node, run_id, request, _record(group, b"honest", chain), timeout=10)
    assert wait_for_admission(joiner, run_id, nonce, timeout=20, poll_interval=0.2)[0]["digest"] == b"honest"


def test_a_squatted_run_id_stops_a_joiner_unless_it_trusts_a_member(hivemind_swarm) -> None:
    """Fresh identities can make a first group of their own for a run id (not Sybil-resistant). A joiner that trusts
    nobody sees two first groups named and stops with an error that says what to do; one that trusts member 1 takes
    the chain member 1 signed, and never the squatter's."""
    nodes = hivemind_swarm.nodes
    joiner, squatter = nodes[3], nodes[4]
    run_id, group, nonce, chain = _asking(nodes, joiner, b"k" * 32)
    request = JoinRequest(joiner.peer_id, b"k" * 32, nonce)
    own = _genesis(run_id, [squatter])
    announce_running(squatter, run_id, 0, own.links[0].digest)
    publish_admission(squatter, run_id, request, _record([squatter.peer_id], b"squatted", own), timeout=10)
    with pytest.raises(UserError, match="claimed by 2 groups.*trusted_peers"):
        wait_for_admission(joiner, run_id, nonce, timeout=10, poll_interval=0.2)
    for node in nodes[:3]:
        publish_admission(node, run_id, request, _record(group, b"honest", chain), timeout=10)
    trusted = [nodes[1].peer_id.to_base58()]
    assert wait_for_admission(joiner, run_id, nonce, timeout=20, poll_interval=0.2, trusted=trusted)[0]["digest"] == b"honest"
