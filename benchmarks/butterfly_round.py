"""One ButterflyClip round with tau=inf (the plain mean) against gloo's all_reduce, same tensors, same processes.

    ./run bench butterfly_round            # 11M floats, 4 processes (target: <= 1.0x)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist
from common import spawn_ranks

from lightning_btard.aggregators import resolve_aggregator
from lightning_btard.ops.partition import part_sizes
from lightning_btard.protocol.butterfly import butterfly_aggregate
from lightning_btard.transports import TorchDistributedTransport


def worker(rank: int, world: int, port: int, numel: int, repeat: int, tau: float, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    transport = TorchDistributedTransport()
    x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    agg = resolve_aggregator("centered_clip", tau=tau)

    def timed(fn):
        times = []
        for i in range(repeat + 1):
            dist.barrier()
            t = time.perf_counter()
            fn()
            if i:
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    buf = x.clone()
    out = torch.empty_like(x)  # as the strategy does: the aggregate lands in a reused buffer
    phases: dict[str, list[float]] = {}

    def round_() -> None:
        _, stats = butterfly_aggregate(x, transport, agg, out=out)
        for k, v in stats.seconds.items():
            phases.setdefault(k, []).append(v)

    sizes = part_sizes(numel, world)

    def transfers() -> None:  # the round's two exchanges of the same bytes, with nothing computed between them
        received = transport.scatter_parts(x, sizes)
        transport.gather_parts(received[rank], sizes, out=out)

    t_allreduce = timed(lambda: dist.all_reduce(buf))
    t_butterfly = timed(round_)
    t_transfers = timed(transfers)
    t_allreduce2 = timed(lambda: dist.all_reduce(buf))
    if rank == 0:
        medians = {k: statistics.median(v) for k, v in phases.items()}
        queue.put((min(t_allreduce, t_allreduce2), t_butterfly, t_transfers, medians))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--numel", type=int, default=11_000_000)
    p.add_argument("--repeat", type=int, default=11)
    p.add_argument("--tau", type=float, default=float("inf"))
    a = p.parse_args()
    t_allreduce, t_butterfly, t_transfers, phases = spawn_ranks(worker, a.world, a.numel, a.repeat, a.tau, timeout=600)
    print(f"ButterflyClip round vs gloo all_reduce: {a.numel:,} floats, {a.world} processes, tau={a.tau}\n")
    print("| what | time (median) | ratio |\n|---|---|---|")
    print(f"| gloo all_reduce (sum) | {t_allreduce * 1e3:,.1f} ms | 1.00x |")
    print(f"| butterfly_aggregate (scatter, aggregate, gather) | {t_butterfly * 1e3:,.1f} ms | {t_butterfly / t_allreduce:.2f}x |")
    for k, v in phases.items():
        print(f"| &nbsp;&nbsp;{k} (rank 0) | {v * 1e3:,.1f} ms | {v / t_allreduce:.2f}x |")
    print(f"| the two transfers alone (scatter, then gather, nothing aggregated) | {t_transfers * 1e3:,.1f} ms | "
          f"{t_transfers / t_allreduce:.2f}x |")
    print("\nThe transfers alone are the round's floor here: the aggregation has only the gap between them and the "
          "all-reduce\nto fit in (4 processes on 2 cores leave no idle core to hide it in; docs/benchmarks.md).")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
