"""Board records too large for hivemind's DHT (4 MiB unary messages) travel by reference
(``transports/hivemind_records.py``): evidence with a ResNet18- or ALBERT-large-sized part reaches every member, checked
against the digest its writer published; a writer that does not serve its record, or serves other bytes, is the
collective's culprit, like a silent one."""

from __future__ import annotations

import os
import time

import pytest
import torch
from peers import run_in_threads

from lightning_btard.transports.base import CollectiveFailure
from lightning_btard.transports.codec import encode_record
from lightning_btard.transports.hivemind import HivemindTransport
from lightning_btard.transports.hivemind_keys import board_key
from lightning_btard.transports.hivemind_records import INLINE_LIMIT, parse_reference, reference

pytestmark = pytest.mark.timeout(240)

RESNET18_PART = 11_689_512 // 4  # a part of torchvision's ResNet18 among 4 peers: 11.7 MB of float32
ALBERT_LARGE_PART = 17_683_968 // 4  # ALBERT-large's parameters among 4 peers: 17.7 MB


def _group(swarm, n: int, timeout: float) -> list[HivemindTransport]:
    nodes = swarm.nodes[:n]
    members, session = [node.peer_id for node in nodes], os.urandom(16)
    return [HivemindTransport(node, members, session, timeout=timeout) for node in nodes]


@pytest.mark.parametrize("numel", [RESNET18_PART, ALBERT_LARGE_PART], ids=["resnet18-part", "albert-large-part"])
def test_evidence_with_a_whole_part_reaches_every_member(hivemind_swarm, numel: int) -> None:
    """Before, a record this large failed to store in the DHT: the accusation became a timeout and a regroup."""
    group = _group(hivemind_swarm, 3, timeout=60.0)
    parts = {r: torch.randn(numel, generator=torch.Generator().manual_seed(r)) for r in range(3)}

    def member(t):
        record = {"kind": "bad-part", "part": parts[t.rank]} if t.rank == 1 else {"kind": "none"}
        return t.all_gather_object(record)

    try:
        out = run_in_threads(group, member, 200)
    finally:
        for t in group:
            t.close()
    for views in out:
        assert views[0] == {"kind": "none"} and views[2] == {"kind": "none"}
        assert views[1]["kind"] == "bad-part" and torch.equal(views[1]["part"], parts[1])
    assert group[1].node.records.held_bytes() == 0  # closing the transport dropped what it served


@pytest.mark.parametrize("lie", ["unserved", "other bytes", "huge"])
def test_a_writer_that_does_not_serve_its_reference_is_the_culprit(hivemind_swarm, lie: str) -> None:
    group = _group(hivemind_swarm, 3, timeout=4.0)
    big = {"part": torch.zeros(INLINE_LIMIT)}

    def member(t):
        if t.rank == 2:  # publishes a reference by hand, and serves nothing or something else
            data = encode_record(big)
            ref = reference(data)
            if lie == "other bytes":  # the same size, one byte flipped
                t.node.records.put(t.session, t.members, data)
                t.node.records._sessions[t.session][1][parse_reference(ref)[0]] = data[:-1] + bytes([data[-1] ^ 1])
            if lie == "huge":
                ref = ref[:-8] + (2**40).to_bytes(8, "little")
            t.publish(board_key(t.session, t._next()), ref, time.monotonic() + 4)
            return None
        try:
            return t.all_gather_object(t.rank)
        except CollectiveFailure as failure:
            return failure.culprits

    try:
        out = run_in_threads(group, member, 60)
    finally:
        for t in group:
            t.close()
    if lie == "huge":  # the reference itself is malformed: the same for every reader, a malformed record
        assert out[0] == out[1] == [0, 1, None]
    else:
        assert out[0] == out[1] == [group[0].members[2]]


def test_a_large_value_is_stored_by_reference_and_read_back_where_asked(hivemind_swarm) -> None:
    """A DHT call over 16 KiB crosses hivemind's pipe in two writes, and its DHT process, reading a non-blocking
    descriptor, could catch the first alone and die (seen in the swarm soak with a 20 KB admission record). Values over
    INLINE_LIMIT are stored by reference; readers that expect large values resolve it against the digest."""
    writer, reader = hivemind_swarm.nodes[0], hivemind_swarm.nodes[1]
    key = f"btard/test-large/{os.urandom(4).hex()}"
    value = os.urandom(3 * INLINE_LIMIT)
    assert writer.store(key, value, 600)
    assert reader.get_owned(key, resolve=True)[writer.peer_id] == value
    assert len(reader.get_owned(key)[writer.peer_id]) < 100  # the reference itself, unless asked
    assert writer.get_owned(key, resolve=True)[writer.peer_id] == value  # its own, from its own store
    writer.records._public.clear()  # no longer served: the entry is left out, after a bounded wait
    started = time.monotonic()
    assert writer.peer_id not in reader.get_owned(key, resolve=True)
    assert time.monotonic() - started < 10
