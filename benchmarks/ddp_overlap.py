"""What DDP's overlap of its all-reduce with the backward pass buys on this machine, side by side in one run.

    ./run bench ddp_overlap                      # torchvision's resnet18, CIFAR-sized batch of 8, 4 processes, gloo

Three ways of taking a training step (forward, backward, SGD step) on every rank, interleaved:

- ``ddp``: ``DistributedDataParallel`` (bucketed all-reduces started from gradient hooks during backward);
- ``after``: no DDP; after backward, the gradients flattened into one buffer, one ``all_reduce``, copied back (what a
  strategy that aggregates after backward does, with the cheapest aggregation there is);
- ``compute``: no communication at all (the floor).

Issue 16's first lever is to start BTARD's scatter from gradient hooks as DDP does. Where ``after`` is no slower than
``ddp``, the overlap buys nothing here and that lever cannot pay on this machine (4 processes sharing 2 cores: a
transfer during backward takes the core the backward needed). The same file also times the flattening copy alone and
inside gradient hooks (the other half of DDP's ``gradient_as_bucket_view``), in one process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from common import spawn_ranks


def _model():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def worker(rank: int, world: int, port: int, steps: int, rounds: int, batch: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    best: dict[str, float] = {}
    for _ in range(rounds):
        for mode in ("ddp", "after", "compute"):
            net = _model()
            model = torch.nn.parallel.DistributedDataParallel(net) if mode == "ddp" else net
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            params = list(net.parameters())
            flat = torch.empty(sum(p.numel() for p in params))
            times = []
            for _ in range(steps):
                dist.barrier()
                t = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                if mode == "after":
                    torch.cat([p.grad.reshape(-1) for p in params], out=flat)
                    dist.all_reduce(flat)
                    flat.div_(world)
                    offset = 0
                    for p in params:
                        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                        offset += p.numel()
                opt.step()
                times.append(time.perf_counter() - t)
            median = statistics.median(times[steps // 4 :])
            best[mode] = min(best.get(mode, float("inf")), median)
    if rank == 0:
        queue.put(best)
    dist.destroy_process_group()


def flatten_in_hooks(steps: int, batch: int) -> dict[str, float]:
    """One process: backward then one ``torch.cat`` of the gradients, against copies made in post-accumulate hooks."""
    torch.set_num_threads(1)
    net = _model()
    params = list(net.parameters())
    flat = torch.empty(sum(p.numel() for p in params))
    views, offset = {}, 0
    for p in params:
        views[p] = flat[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    use_hooks = [False]

    def hook(p: torch.Tensor) -> None:
        if use_hooks[0] and p.grad is not views[p]:
            views[p].copy_(p.grad)
            p.grad = views[p]

    for p in params:
        p.register_post_accumulate_grad_hook(hook)
    times: dict[str, list[float]] = {"backward, then cat": [], "backward, copies in hooks": []}
    for _ in range(steps):
        for mode in times:
            use_hooks[0] = "hooks" in mode
            for p in params:
                p.grad = None
            t = time.perf_counter()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            if not use_hooks[0]:
                torch.cat([p.grad.reshape(-1) for p in params], out=flat)
            times[mode].append(time.perf_counter() - t)
    return {k: statistics.median(v[steps // 4 :]) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2, help="interleaved runs of each mode; the best median counts")
    p.add_argument("--batch", type=int, default=8)
    a = p.parse_args()
    best = spawn_ranks(worker, a.world, a.steps, a.rounds, a.batch)
    assert isinstance(best, dict)
    print(f"\n### DDP's overlap: torchvision resnet18, batch {a.batch}, {a.world} processes (gloo), best of {a.rounds}\n")
    print("| step | median on rank 0 | vs DDP |\n|---|---|---|")
    for mode, label in (("ddp", "DDP (all-reduce overlapped with backward)"), ("after", "one all-reduce after backward"),
                        ("compute", "no communication")):
        print(f"| {label} | {best[mode] * 1e3:,.1f} ms | {best[mode] / best['ddp']:.2f}x |")
    hooks = flatten_in_hooks(a.steps, a.batch)
    print("\n| one process | median |\n|---|---|")
    for k, v in hooks.items():
        print(f"| {k} | {v * 1e3:,.1f} ms |")


if __name__ == "__main__":
    main()
