"""One aggregation round on the hivemind backend against hivemind's own DecentralizedAverager, same peers and tensors.

    ./run bench hivemind_round                 # 4 peers on loopback, 2M floats (target: ours / hivemind <= 1.2x)
    ./run bench hivemind_round --peers 3 --numel 4000000

Each peer is a process with one hivemind node. Timed per round, median over repeats:
- ours, tau=inf, no verification: ButterflyClip (the mean) over ``HivemindTransport``;
- hivemind: ``DecentralizedAverager.step`` for the same tensor, matchmaking done beforehand (pre-scheduled,
  ``require_trigger``), so that only its all-reduce is timed, as ``hivemind.Optimizer`` overlaps matchmaking;
- ours, verified (CenteredClip tau=1, commitments, MPRNG, projection checks, on the board in the DHT).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.multiprocessing as mp


def worker(rank: int, args, queue, results) -> None:
    torch.set_num_threads(1)
    from hivemind import DecentralizedAverager
    from hivemind.averaging.control import AveragingStage
    from hivemind.utils.timed_storage import get_dht_time

    from lightning_btard.aggregators import resolve_aggregator
    from lightning_btard.groups.hivemind_rendezvous import rendezvous
    from lightning_btard.protocol.butterfly import butterfly_aggregate
    from lightning_btard.protocol.identity import Identity
    from lightning_btard.protocol.round import RoundConfig, verified_round
    from lightning_btard.transports.hivemind_node import HivemindNode

    if rank == 0:
        node = HivemindNode()
        for _ in range(args.peers - 1):
            queue.put(node.visible_maddrs)
    else:
        node = HivemindNode(initial_peers=queue.get())
    transport = rendezvous(node, "bench-hivemind-round", args.peers, timeout=120, poll_interval=0.05)
    me = transport.rank
    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(me))
    out = torch.empty_like(x)
    mean = resolve_aggregator("centered_clip", tau=float("inf"))
    averager = DecentralizedAverager(
        averaged_tensors=[x.clone()], dht=node.dht, prefix="bench", target_group_size=args.peers,
        min_group_size=args.peers, min_matchmaking_time=2.0, request_timeout=1.0, start=True,
    )
    identity = Identity.generate()
    keys = transport.all_gather_object(identity.public)
    times: dict[str, list[float]] = {"ours": [], "hivemind": [], "verified": []}
    for i in range(args.repeat + 1):
        transport.barrier()
        t = time.perf_counter()
        butterfly_aggregate(x, transport, mean, out=out)
        ours = time.perf_counter() - t

        with averager.get_tensors() as tensors:
            tensors[0].copy_(x)
        control = averager.step(wait=False, require_trigger=True, scheduled_time=get_dht_time() + 5.0, timeout=60)
        while control.stage != AveragingStage.AWAITING_TRIGGER and not control.done():
            time.sleep(0.01)
        transport.barrier()
        t = time.perf_counter()
        control.allow_allreduce()
        ok = control.result(timeout=120)
        hm = time.perf_counter() - t
        if ok is None:
            raise RuntimeError("hivemind's averager did not complete a round")

        transport.barrier()
        t = time.perf_counter()
        outcome = verified_round(x.clone(), transport, identity, keys, list(range(transport.world_size)), step=i,
                                 config=RoundConfig(tau=1.0))
        verified = time.perf_counter() - t
        assert outcome.aggregate is not None and not outcome.bans
        if i:
            times["ours"].append(ours)
            times["hivemind"].append(hm)
            times["verified"].append(verified)
    with averager.get_tensors() as tensors:
        hivemind_mean = tensors[0].clone()
    if me == 0:
        # same answer: hivemind's mean equals ours (tau = inf)
        results.put({k: statistics.median(v) for k, v in times.items()} | {"max_diff": float((hivemind_mean - out).abs().max())})
    transport.barrier()
    averager.shutdown()
    node.shutdown()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--numel", type=int, default=2_000_000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    ctx = mp.get_context("fork")  # hivemind starts its averager and DHT as forked processes of the worker
    queue, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args, queue, results)) for r in range(args.peers)]
    for proc in procs:
        proc.start()
    try:
        res = results.get(timeout=900)
    finally:
        for proc in procs:
            proc.join(60)
            if proc.is_alive():
                proc.kill()
    ours, hm, ver = res["ours"], res["hivemind"], res["verified"]
    print(f"hivemind backend, {args.peers} peers on loopback, {args.numel:,} floats, median of {args.repeat}:")
    print(f"  ButterflyClip tau=inf over HivemindTransport: {ours * 1e3:8.1f} ms")
    print(f"  hivemind DecentralizedAverager all-reduce:    {hm * 1e3:8.1f} ms   -> ours / hivemind = {ours / hm:.2f}x (target <= 1.2x)")
    print(f"  verified round (CenteredClip tau=1):          {ver * 1e3:8.1f} ms   -> {ver / ours:.2f}x ours unverified, {ver / hm:.2f}x hivemind")
    print(f"  max |hivemind mean - our mean| = {res['max_diff']:.2e}")


if __name__ == "__main__":
    main()
