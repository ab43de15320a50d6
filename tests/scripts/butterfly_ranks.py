"""One rank of the ButterflyClip-over-gloo test: aggregates known inputs, saves what it got."""

import os
import sys

import torch
import torch.distributed as dist

from lightning_btard.aggregators import resolve_aggregator
from lightning_btard.protocol.butterfly import butterfly_aggregate
from lightning_btard.transports import TorchDistributedTransport

out_dir, d = sys.argv[1], int(sys.argv[2])
dist.init_process_group("gloo")
rank, n = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(1234)
inputs = torch.randn(n, d, generator=g)
inputs[n - 1] *= 1000.0  # one outlier peer
transport = TorchDistributedTransport()
mine = inputs[rank].clone()
mean_bf, _ = butterfly_aggregate(mine, transport, resolve_aggregator("centered_clip", tau=float("inf")))
reduced = mine.clone()
dist.all_reduce(reduced)
clip_bf, stats = butterfly_aggregate(mine, transport, resolve_aggregator("centered_clip", tau=0.5, eps=1e-7))
torch.save(
    {"inputs": inputs, "mean_bf": mean_bf, "all_reduce_mean": reduced / n, "clip_bf": clip_bf, "part_stats": stats.part_stats},
    os.path.join(out_dir, f"rank{rank}.pt"),
)
dist.destroy_process_group()
