"""One verified round (commit, scatter, aggregate, gather, reveal, verify) against one unverified ButterflyClip round
of the same tensors, over gloo, in one run: what verification adds to the aggregation alone, phase by phase.

    ./run bench verified_round                      # 11.2M floats (a ResNet18), 4 processes, tau=1
    ./run bench verified_round --profile 25         # and rank 0's 25 costliest functions in the verified rounds

No model and no validators: the training step's other costs are in ``strategy_step``. First, alone in this process on
one thread, the verification's own arithmetic per peer and round (hashes, directions, projections) and a validator's
check: what no scheduling can remove when every peer's process has a share of a core.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import time

import torch
import torch.distributed as dist
from common import spawn_ranks

from lightning_btard.aggregators import resolve_aggregator
from lightning_btard.ops.partition import part_sizes
from lightning_btard.ops.projection import LazyDirections, clipped_projections
from lightning_btard.ops.workspace import SCRATCH
from lightning_btard.protocol.butterfly import butterfly_aggregate
from lightning_btard.protocol.digest import digest
from lightning_btard.protocol.engine import round_config_of
from lightning_btard.protocol.identity import Identity
from lightning_btard.protocol.round import verified_round
from lightning_btard.protocol.validation import StepRecord, ValidationCheck
from lightning_btard.transports import TorchDistributedTransport


def worker(rank: int, world: int, port: int, numel: int, repeat: int, tau: float, profile: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    transport = TorchDistributedTransport()
    identity = Identity.generate()
    keys = transport.all_gather_object(identity.public)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(numel, generator=g) * 1e-3 + torch.randn(numel, generator=torch.Generator().manual_seed(99)) * 1e-3
    agg = resolve_aggregator("centered_clip", tau=tau)
    config = round_config_of(agg)
    out = torch.empty_like(x)
    phases: dict[str, dict[str, list[float]]] = {"unverified": {}, "verified": {}}
    totals: dict[str, list[float]] = {"unverified": [], "verified": []}
    profiler = cProfile.Profile() if profile and rank == 0 else None

    def unverified() -> None:
        _, stats = butterfly_aggregate(x, transport, agg, out=out)
        for k, v in stats.seconds.items():
            phases["unverified"].setdefault(k, []).append(v)

    def verified(i: int) -> None:
        outcome = verified_round(x, transport, identity, keys, list(range(world)), i, config, out=out,
                                 context=i.to_bytes(8, "little"))
        assert outcome.aggregate is not None and not outcome.bans, outcome.bans
        for k, v in outcome.stats.items():
            if k.startswith("time_"):
                phases["verified"].setdefault(k[5:], []).append(v)

    for i in range(repeat + 1):  # interleaved; the first of each is a warm-up
        for name in ("unverified", "verified"):
            dist.barrier()
            if profiler is not None and name == "verified" and i:
                profiler.enable()
            t = time.perf_counter()
            unverified() if name == "unverified" else verified(i)
            elapsed = time.perf_counter() - t
            if profiler is not None and name == "verified" and i:
                profiler.disable()
            if i:
                totals[name].append(elapsed)
    if rank == 0:
        report = ""
        if profiler is not None:
            s = io.StringIO()
            pstats.Stats(profiler, stream=s).sort_stats("tottime").print_stats(profile)
            report = s.getvalue()
        queue.put(({k: statistics.median(v) for k, v in totals.items()},
                   {name: {k: statistics.median(v) for k, v in p.items()} for name, p in phases.items()}, report))
    dist.barrier()
    dist.destroy_process_group()


def own_work(numel: int, world: int, directions: int = 2) -> dict[str, float]:
    """Seconds (best of 5, one thread, this process alone) of what verification computes per peer and round on
    ``numel`` parameters in ``world`` parts, and of a validator's check of one gradient."""
    torch.set_num_threads(1)
    sizes = part_sizes(numel, world)
    g, aggregate = torch.randn(numel) * 1e-3, torch.randn(numel) * 1e-3
    parts, aggregates = torch.split(g, sizes), torch.split(aggregate, sizes)
    received = torch.randn(world, sizes[0]) * 1e-3
    checkers = (world - 1) // 2
    z = torch.randn(directions, max(sizes))
    record = StepRecord(step=0, peers=list(range(world)), sizes=sizes, seed=b"s" * 32, contributors=list(range(world)),
                        directions=directions, aggregate=aggregate, tau=1.0,
                        projections={0: []}, numbers={0: []})
    for j in range(world):  # what an honest peer 0 published: the check passes, so it reads every part
        s_j, distance, p_j = clipped_projections(record.direction(j, g.device), parts[j], aggregates[j], 1.0)
        record.projections[0].append(p_j.tolist())
        record.numbers[0].append([s_j.tolist(), float(distance), p_j.tolist(), float(parts[j].norm())])

    def draw() -> None:
        lazy = LazyDirections(b"s" * 32, sizes, directions, "cpu",
                              SCRATCH.view("vector", (directions * max(sizes),), torch.float32, "cpu"))
        for j in range(world):
            lazy[j]

    work = {
        "commit: hash my parts": lambda: [digest(p) for p in parts],
        f"scatter: hash the {world} parts received and {checkers} own part(s) checked":
            lambda: [digest(r) for r in received] + [digest(parts[0]) for _ in range(checkers)],
        "gather: hash the aggregates received": lambda: [digest(a) for a in aggregates],
        f"verify: draw {directions} directions over every parameter": draw,
        "verify: my numbers for every part":
            lambda: [clipped_projections(z[:, : sizes[j]], parts[j], aggregates[j], 1.0) for j in range(world)],
        f"verify: recompute the {world} senders' numbers for my part": lambda: clipped_projections(z[:, : sizes[0]], received, aggregates[0], 1.0),
        f"verify: recompute {checkers} aggregator(s)' numbers for its own part":
            lambda: [clipped_projections(z[:, : sizes[0]], parts[0], aggregates[0], 1.0) for _ in range(checkers)],
        "a validator's check of one gradient (a verified step; the others wait for it)":
            lambda: ValidationCheck().agrees(record, 0, g),
    }
    assert ValidationCheck().agrees(record, 0, g)
    out = {}
    for name, fn in work.items():
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = min(times)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--numel", type=int, default=11_200_000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--profile", type=int, default=0, help="print rank 0's N costliest functions (cProfile, own time)")
    a = p.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    work = own_work(a.numel, a.world)
    print(f"Verification's own work per peer and round, {a.numel:,} parameters in {a.world} parts, one thread, alone:\n")
    print("| work | time |\n|---|---|")
    for name, seconds in work.items():
        print(f"| {name} | {seconds * 1e3:,.1f} ms |")
    check = work.pop("a validator's check of one gradient (a verified step; the others wait for it)")
    per_peer = sum(work.values())
    share = max(1.0, a.world / cores)
    print(f"| **a round's, every peer** | **{per_peer * 1e3:,.1f} ms** |\n")
    print(f"{a.world} processes on {cores} cores: each has {1 / share:.2f} of a core, so a verified round takes at least "
          f"{per_peer * share * 1e3:,.0f} ms more than an unverified one, and a verified step with a validator "
          f"{(per_peer * share + check) * 1e3:,.0f} ms more (before any signature, board round or transfer).\n")
    totals, phases, report = spawn_ranks(worker, a.world, a.numel, a.repeat, a.tau, a.profile)
    print(f"A verified round against an unverified one: {a.numel:,} floats, {a.world} processes, tau={a.tau}, "
          f"median of {a.repeat} interleaved rounds on rank 0\n")
    print("| round | time | ratio |\n|---|---|---|")
    print(f"| unverified (scatter, CenteredClip, gather) | {totals['unverified'] * 1e3:,.1f} ms | 1.00x |")
    print(f"| verified (no validators) | {totals['verified'] * 1e3:,.1f} ms | {totals['verified'] / totals['unverified']:.2f}x |")
    for name, p_ in phases.items():
        print(f"\n{name} phases: " + ", ".join(f"{k} {v * 1e3:,.1f} ms" for k, v in p_.items()))
    if report:
        print("\nrank 0, verified rounds, by own time:\n" + report)


if __name__ == "__main__":
    main()
