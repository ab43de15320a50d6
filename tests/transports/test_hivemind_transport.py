"""The hivemind transport on loopback: collectives against direct computations, deadlines instead of hangs,
records nobody can write for another peer, malformed messages delivered as such, untrusted records decoded
without running code. (The protocol tests run on it too: the ``peers`` fixture of test_round, test_butterfly
and test_validation.)"""

from __future__ import annotations

import os
import time

import pytest
import torch

from lightning_btard.transports.base import TransportError
from lightning_btard.transports.codec import decode_record, encode_record
from lightning_btard.transports.hivemind import HivemindTransport
from lightning_btard.transports.hivemind_mailbox import Malformed, MessageServicer
from lightning_btard.transports.hivemind_node import peer_id_of_owner

pytestmark = pytest.mark.timeout(180)


def test_collectives_match_their_definitions(hivemind_swarm) -> None:
    n, sizes = 4, [3, 2, 2, 1]
    flats = [torch.randn(8, generator=torch.Generator().manual_seed(r)) for r in range(n)]

    def peer(t):
        me = t.rank
        return {
            "scatter": t.scatter_parts(flats[me], sizes),
            "gather": t.gather_parts(torch.full((sizes[me],), float(me)), sizes),
            "extra": t.gather_parts_with_extra(torch.full((sizes[me],), float(me)), torch.tensor([me, -me]), sizes),
            "sum": t.all_reduce(flats[me], "sum"), "max": t.all_reduce(flats[me], "max"),
            "board": t.all_gather_object({"rank": me, "blob": bytes([me]) * me, "pair": (me, None)}),
            "bcast": t.broadcast_object(["from", me], src=2),
            "tensor": t.broadcast_tensor_(torch.full((3,), float(me)), src=1),
            "sub": (lambda s: None if s is None else (s.rank, s.all_gather_object(me)))(t.subgroup([1, 3])),
        }

    out = hivemind_swarm.run(n, peer)
    stacked = torch.stack(flats)
    starts = [0, 3, 5, 7]
    for me, o in enumerate(out):
        assert torch.equal(o["scatter"], torch.stack([f[starts[me] : starts[me] + sizes[me]] for f in flats]))
        assert torch.equal(o["gather"], torch.tensor([0, 0, 0, 1, 1, 2, 2, 3.0]))
        assert torch.equal(o["extra"][1], torch.tensor([[0, 0], [1, -1], [2, -2], [3, -3]]))
        assert torch.allclose(o["sum"], stacked.sum(0)) and torch.equal(o["max"], stacked.amax(0))
        assert o["board"] == [{"rank": r, "blob": bytes([r]) * r, "pair": (r, None)} for r in range(n)]
        assert o["bcast"] == ["from", 2] and torch.equal(o["tensor"], torch.ones(3))
        assert o["sub"] == (None if me in (0, 2) else ([1, 3].index(me), [1, 3]))


def test_a_silent_member_fails_the_collective_within_the_deadline(hivemind_swarm) -> None:
    nodes = hivemind_swarm.nodes[:3]
    members, session = [n.peer_id for n in nodes], os.urandom(16)
    transports = [HivemindTransport(node, members, session, timeout=2.0) for node in nodes[:2]]  # member 2 never comes
    started = time.monotonic()
    with pytest.raises(TransportError, match=str(members[2])):
        transports[0].gather_parts(torch.ones(1), [1, 1, 1])
    with pytest.raises(TransportError, match=str(members[2])):
        transports[1].all_gather_object("hello")
    assert time.monotonic() - started < 20
    for t in transports:
        t.close()


def test_nobody_writes_another_peers_board_record(hivemind_swarm) -> None:
    a, b = hivemind_swarm.nodes[:2]
    key = f"btard/test/{os.urandom(4).hex()}"
    assert a.store(key, b"mine", ttl=60)
    assert peer_id_of_owner(a.owner) == a.peer_id and peer_id_of_owner(b"[owner:not a key]") is None
    # b signs with its own key: a record under a's owner marker does not validate anywhere
    from hivemind.utils.timed_storage import get_dht_time

    forged = b.dht.store(key, b"forged", get_dht_time() + 60, subkey=a.owner)
    assert not forged
    entries = b.get_owned(key)
    assert entries == {a.peer_id: b"mine"}


def test_malformed_tensor_messages_arrive_as_malformed(hivemind_swarm) -> None:
    from hivemind.proto import runtime_pb2
    from hivemind.utils import MSGPackSerializer

    a, b = hivemind_swarm.nodes[:2]
    session = os.urandom(16)
    tb = HivemindTransport(b, [a.peer_id, b.peer_id], session, timeout=5.0)  # b accepts a's pushes to it

    async def push(requests):
        stub = MessageServicer.get_stub(a.p2p, b.peer_id, namespace=a.namespace)
        await stub.rpc_push(requests, timeout=10)
        return await b.mailbox.receive(session, 1, a.peer_id)

    async def bad_dtype():
        yield runtime_pb2.ExpertRequest(metadata=MSGPackSerializer.dumps([session, 1, 1]))
        yield runtime_pb2.ExpertRequest(tensors=[runtime_pb2.Tensor(buffer=b"\0" * 8, size=[1], dtype="object", chunks=1)])

    got = a.run(push(bad_dtype()), timeout=30)
    assert isinstance(got, Malformed) and "object" in got.reason

    async def wrong_size():  # 8 bytes announced as 3 float32
        yield runtime_pb2.ExpertRequest(metadata=MSGPackSerializer.dumps([session, 2, 1]))
        yield runtime_pb2.ExpertRequest(tensors=[runtime_pb2.Tensor(buffer=b"\0" * 8, size=[3], dtype="float32", chunks=1)])

    async def push2():
        stub = MessageServicer.get_stub(a.p2p, b.peer_id, namespace=a.namespace)
        await stub.rpc_push(wrong_size(), timeout=10)
        return await b.mailbox.receive(session, 2, a.peer_id)

    assert isinstance(a.run(push2(), timeout=30), Malformed)
    tb.close()

    # through the transport: a wrong-shaped part is reported by exchange as the message received
    def peer(t):
        to_peer_1 = torch.ones(4) if t.rank == 0 else torch.ones(2)  # peer 0 sends 4 elements where 2 are due
        recvs = [[torch.empty(2)], [torch.empty(2)]]
        return t.exchange([[torch.ones(2)], [to_peer_1]], recvs)

    out = hivemind_swarm.run(2, peer)
    assert out[0] == [None, None]
    assert out[1][1] is None and out[1][0] is not None and out[1][0][0].shape == (4,)


def test_board_records_decode_plain_data_only() -> None:
    record = {"h": b"\x00" * 32, "nums": [1.5, float("inf")], "t": torch.arange(4, dtype=torch.int16), 3: (None, True)}
    back = decode_record(encode_record(record))
    assert back.keys() == record.keys() and torch.equal(back["t"], record["t"]) and back[3] == (None, True)
    assert decode_record(b"\xc1not msgpack") is None
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    assert decode_record(pickle.dumps(Evil())) is None  # a pickle is not a record: nothing is executed
    with pytest.raises(TypeError):
        encode_record(object())


def _push(node, to, session: bytes, seq: int, tensors) -> bool:
    """A raw push from ``node`` to peer ``to``: whether it was accepted (a refused push is cut off at its header: the
    sender sees its reply, or its stream broken)."""

    async def go():
        stub = MessageServicer.get_stub(node.p2p, to, namespace=node.namespace)
        try:
            return (await stub.rpc_push(MessageServicer.requests(session, seq, tensors), timeout=10)).metadata == b""
        except Exception:  # noqa: BLE001 - the stream closed by the receiver
            return False

    return node.run(go(), timeout=30)


def test_the_mailbox_refuses_outsiders_and_members_running_far_ahead_and_holds_nothing_received(hivemind_swarm) -> None:
    """Pushes are read only for a session this peer opened, from its members, at most ``AHEAD`` collectives ahead;
    a received message is not kept. (Before: any libp2p peer could push up to 2 GiB to any session, and every
    received message stayed in memory until its session closed.)"""
    from lightning_btard.transports.hivemind_mailbox import Mailbox

    a, b, outsider = hivemind_swarm.nodes[:3]
    session = os.urandom(16)
    assert b.mailbox.refusal(session, 1, a.peer_id) == "no such session open here (yet)"
    assert not _push(a, b.peer_id, session, 1, [torch.ones(3)])
    held = b.mailbox.held()
    tb = HivemindTransport(b, [a.peer_id, b.peer_id], session, timeout=5.0)
    ta = HivemindTransport(a, [a.peer_id, b.peer_id], session, timeout=5.0)
    assert b.mailbox.refusal(session, 1, outsider.peer_id) == "not a member of the session"
    assert not _push(outsider, b.peer_id, session, 1, [torch.ones(3)])
    assert "is not within" in b.mailbox.refusal(session, Mailbox.AHEAD + 1, a.peer_id)
    assert not _push(a, b.peer_id, session, Mailbox.AHEAD + 1, [torch.ones(3)])
    assert b.mailbox.refusal(session, Mailbox.AHEAD, a.peer_id) is None
    assert b.mailbox.held() == held  # nothing of the refused pushes was kept
    for _ in range(3 * Mailbox.AHEAD):  # many collectives: none leaves a message behind
        out = hivemind_swarm.run_transports([ta, tb], lambda t: t.gather_parts(torch.full((2,), float(t.rank)), [2, 2]))
        assert all(torch.equal(o, torch.tensor([0.0, 0, 1, 1])) for o in out)
    assert b.mailbox.held() == held
    ta.close()
    tb.close()
    assert b.mailbox.refusal(session, tb.seq + 1, a.peer_id) == "no such session open here (yet)"


def test_a_message_over_the_cap_is_malformed_and_an_idle_session_waits_for_its_receive(hivemind_swarm) -> None:
    a, b = hivemind_swarm.nodes[:2]
    session = os.urandom(16)
    tb = HivemindTransport(b, [a.peer_id, b.peer_id], session, timeout=5.0)
    old_cap, old_ttl = b.mailbox.max_message_bytes, b.mailbox.ttl
    b.mailbox.max_message_bytes, b.mailbox.ttl = 100, 0.0  # every session is idle at once
    try:
        import asyncio

        async def wait_then_deliver():
            waiting = asyncio.ensure_future(b.mailbox.receive(session, 1, a.peer_id))
            await asyncio.sleep(0.2)
            b.mailbox._expire()  # idle past ttl, but a receive waits: it stays open
            return waiting

        waiting = b.run(wait_then_deliver(), timeout=10)
        assert _push(a, b.peer_id, session, 1, [torch.ones(1000)])  # accepted, and found too large
        got = b.run(asyncio.wait_for(asyncio.shield(waiting), 5), timeout=10)
        assert isinstance(got, Malformed) and "more than 100 bytes" in got.reason
    finally:
        b.mailbox.max_message_bytes, b.mailbox.ttl = old_cap, old_ttl
        tb.close()
