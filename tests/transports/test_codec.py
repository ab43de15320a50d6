"""The record codec every transport speaks: plain data only, no pickle, a size cap; and the torch transport's board
built on it (a rank that sends a pickle or an oversized record runs no code and allocates nothing beyond the cap)."""

from __future__ import annotations

import os
import pathlib
import pickle
import time

import pytest
import torch
import torch.multiprocessing as mp
from procs import free_port

from lightning_btard.transports.codec import RecordTooLarge, decode_record, encode_record


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/btard-codec-pwned",))


def test_plain_records_round_trip() -> None:
    record = [1, -2.5, "s", b"\x00\xff", None, True, (1, [2, (3,)]), {"k": [b"v"]}, pathlib.Path("/a/b"),
              torch.arange(6, dtype=torch.int16).reshape(2, 3), torch.tensor([], dtype=torch.float64)]
    back = decode_record(encode_record(record))
    for a, b in zip(record, back):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b) and a.dtype == b.dtype
        else:
            assert a == b and type(a) is type(b)


@pytest.mark.parametrize("bad", [pickle.dumps(Evil()), b"\xc1", b"", encode_record([1])[:-1]])
def test_what_is_not_a_record_decodes_to_none(bad: bytes) -> None:
    assert decode_record(bad) is None
    assert not os.path.exists("/tmp/btard-codec-pwned")


def test_hostile_tensor_headers_and_sizes() -> None:
    import msgpack

    def tensor_ext(dtype, shape, raw):
        return msgpack.packb(msgpack.ExtType(1, encode_record([dtype, shape, raw])), use_bin_type=True)

    assert decode_record(tensor_ext("float32", [10**9, 10**9], b"\x00" * 8)) is None  # numel does not match
    assert decode_record(tensor_ext("float32", [-1, 2], b"\x00" * 8)) is None
    assert decode_record(tensor_ext("object", [1], b"\x00" * 8)) is None
    assert decode_record(tensor_ext("float32", [3], b"\x00" * 7)) is None
    assert decode_record(encode_record(b"x" * 100), max_bytes=50) is None
    with pytest.raises(RecordTooLarge):
        decode_record(encode_record(b"x" * 100), strict=True, max_bytes=50)
    with pytest.raises(TypeError):
        encode_record(object())


def _board_rank(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    from lightning_btard.transports import torch_distributed as td

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    transport = td.TorchDistributedTransport(max_record_bytes=10_000)
    if rank == 1:  # a hostile rank: its record is a pickle that would run code
        td.encode_record = lambda obj: pickle.dumps(Evil())
    honest_big = b"y" * 20_000 if rank == 2 else b"ok"
    first = transport.all_gather_object(["rank", rank])
    second = transport.all_gather_object(honest_big)  # rank 2's record is over the cap
    third = transport.broadcast_object({"from": rank}, src=1)
    out[rank] = (first, second, third)
    dist.destroy_process_group()


def _three_ranks(target, check_exit: bool = True) -> dict:
    """Run ``target(rank, port, out)`` on 3 forked gloo ranks; every rank's ``out[rank]`` (``check_exit``: each exited
    cleanly)."""
    ctx = mp.get_context("fork")
    out = ctx.Manager().dict()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, out)) for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not check_exit or all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return dict(out)


def test_the_torch_board_never_unpickles_and_caps_record_sizes() -> None:
    out = _three_ranks(_board_rank)
    assert not os.path.exists("/tmp/btard-codec-pwned")
    first, second, third = out[0]
    assert first == [["rank", 0], None, ["rank", 2]]
    assert second == [b"ok", None, None]
    assert third is None  # rank 1 broadcast a pickle: nothing runs, nothing decodes
    assert out[2][0] == [["rank", 0], None, ["rank", 2]]


def _direct_board_rank(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    from lightning_btard.transports import torch_distributed as td

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    transport = td.TorchDistributedTransport(max_record_bytes=10_000, board_slot=64)
    short_and_long = transport.all_gather_object([b"s" * 10, b"L" * 300, b"z" * 5000][rank])
    only_one_long = transport.all_gather_object(b"x" * (200 if rank == 1 else 3))
    if rank == 1:  # hostile: a length no record has, then a different record for each member (equivocation)
        send = transport._exchange
        transport._exchange = lambda sends, recvs: send(
            [[m.clone().fill_(0).index_fill_(0, torch.arange(8), 255)] for m in (s[0] for s in sends)], recvs)
    negative = transport.all_gather_object(["honest", rank])
    if rank == 1:
        transport._exchange = lambda sends, recvs: send(
            [[_first_message(td.encode_record(f"for {j}"), transport.board_slot)] for j in range(3)], recvs)
    equivocated = transport.all_gather_object(["honest", rank])
    if rank == 1:
        transport._exchange = send
    after = transport.all_gather_object(rank)
    out[rank] = (short_and_long, only_one_long, negative, equivocated, after)
    dist.destroy_process_group()


def _first_message(data: bytes, slot: int):
    first = torch.zeros(8 + slot, dtype=torch.uint8)
    first[:8] = torch.frombuffer(bytearray(len(data).to_bytes(8, "little")), dtype=torch.uint8)
    first[8 : 8 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return first


def test_the_torch_board_takes_each_record_straight_from_its_author() -> None:
    # one message per pair for a record within the slot, a second one for the longer records only; a hostile length
    # is no record; what one member sends never changes what another's record is anywhere (no relays: gloo's
    # all_gather is a ring, where a hostile rank could alter the records it forwards); an author can still send
    # different records to different members (equivocation: the README's "Not yet")
    out = _three_ranks(_direct_board_rank)
    for rank in range(3):
        short_and_long, only_one_long, negative, equivocated, after = out[rank]
        assert short_and_long == [b"s" * 10, b"L" * 300, b"z" * 5000]
        assert only_one_long == [b"xxx", b"x" * 200, b"xxx"]
        assert negative == [["honest", 0], None if rank != 1 else ["honest", 1], ["honest", 2]]
        assert equivocated[0] == ["honest", 0] and equivocated[2] == ["honest", 2]
        assert equivocated[1] == (f"for {rank}" if rank != 1 else ["honest", 1])
        assert after == [0, 1, 2]


def _withheld_rest_rank(rank: int, port: int, out: dict) -> None:
    import datetime

    import torch.distributed as dist

    from lightning_btard.transports import torch_distributed as td

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3,
                            timeout=datetime.timedelta(seconds=3))
    transport = td.TorchDistributedTransport(max_record_bytes=10_000, board_slot=64)
    if rank == 1:  # hostile: announces a record longer than the slot, then never sends its rest
        send = transport._exchange
        announced = _first_message(b"x" * 10, transport.board_slot)
        announced[:8] = torch.tensor(list((200).to_bytes(8, "little")), dtype=torch.uint8)  # 200 > the 64-byte slot
        transport._exchange = lambda sends, recvs: send([[announced] for _ in range(3)], recvs)
        transport.all_gather_object(["honest", rank])  # its own second exchange sends and expects nothing
        out[rank] = "withheld"
        time.sleep(6)  # stays alive past the others' timeout: silent, not gone
        return
    started = time.monotonic()
    try:
        transport.all_gather_object(["honest", rank])
        out[rank] = ("no error", time.monotonic() - started)
    except Exception as e:  # gloo's timeout, as for any silent rank
        out[rank] = (type(e).__name__, time.monotonic() - started)


def test_a_record_whose_rest_is_withheld_fails_the_board_within_the_groups_timeout() -> None:
    """A member that announces a record longer than the slot and never sends the rest: the members waiting for it fail
    within the process group's timeout (a silent rank, as torch.distributed treats any), they do not hang."""
    out = _three_ranks(_withheld_rest_rank, check_exit=False)
    assert out[1] == "withheld"
    for rank in (0, 2):
        error, waited = out[rank]
        assert error != "no error" and waited < 30, out
