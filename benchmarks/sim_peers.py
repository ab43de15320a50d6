"""Simulated peers' cost: a ``btard_sim`` step of N peers against N forward/backward passes of one peer plus the
aggregation, side by side in one process.

    ./run bench sim_peers                                  # SmallCNN, 16 peers, batch 8
    ./run bench sim_peers --model ResNet18 --peers 16

The reference is what any simulation of N peers must do: N forward/backward passes of the model on one peer's batch
(``training_step`` and ``backward``, median of repetitions) plus the aggregation alone (CenteredClip, tau=1, on each of
the N parts of the N gradients, as the N aggregators of a butterfly compute them). Target (issue 15): the unverified
simulated step within 1.3x of it. The verified step (signed round, MPRNG, projection checks, one validator) is
reported against the unverified one. Everything runs in this process on CIFAR-shaped random tensors.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from common import best_of
from strategy_step import StepTimer
from torch.utils.data import DataLoader, TensorDataset

from lightning_btard.aggregators import resolve_aggregator
from lightning_btard.lightning_package import pl
from lightning_btard.ops.partition import flatten_grads, part_sizes


def data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))


def reference(model_name: str, peers: int, batch: int, repeat: int) -> tuple[float, float, int]:
    """(one forward/backward, the aggregation of N gradients, d)."""
    import models

    pl.seed_everything(0)
    model = getattr(models, model_name)(cosine_schedule=False).train()
    loader = DataLoader(data(peers * batch), batch_size=batch)
    batches = list(loader)
    params = [p for p in model.parameters() if p.requires_grad]

    def forward_backward(b=batches[0]) -> None:
        model.zero_grad(set_to_none=True)
        model.training_step(b, 0).backward()

    fb = best_of(forward_backward, repeat=repeat, warmup=2)
    rows = []
    for b in batches:
        forward_backward(b)
        rows.append(flatten_grads(params).clone())
    grads = torch.stack(rows)
    clip = resolve_aggregator("centered_clip", None, tau=1.0, eps=0.0, max_iters=500)
    parts = torch.split(grads, part_sizes(grads.shape[1], peers), dim=1)

    def aggregate() -> None:
        for part in parts:
            clip(part.contiguous(), None)

    return fb, best_of(aggregate, repeat=repeat, warmup=1), grads.shape[1]


def simulated(model_name: str, peers: int, batch: int, steps: int, warmup: int, verify: bool) -> tuple[float, dict]:
    import models
    from lightning_btard import BTARDSimStrategy

    pl.seed_everything(0)
    model = getattr(models, model_name)(cosine_schedule=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.json")
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, strategy=BTARDSimStrategy(num_peers=peers, verify=verify, check_params_every=10**9),
            max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[StepTimer(out)], default_root_dir=tmp,
        )
        trainer.fit(model, DataLoader(data(steps * batch * peers), batch_size=batch, shuffle=True))
        run = json.loads(Path(out).read_text())
    phases = run["phases"][warmup:]
    return statistics.median(run["times"][warmup:]), {k: statistics.median(p.get(k, 0.0) for p in phases) for k in (phases[-1] if phases else {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SmallCNN")
    p.add_argument("--peers", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--repeat", type=int, default=7)
    a = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    fb, agg, d = reference(a.model, a.peers, a.batch, a.repeat)
    plain, plain_phases = simulated(a.model, a.peers, a.batch, a.steps, a.warmup, verify=False)
    verified, verified_phases = simulated(a.model, a.peers, a.batch, a.steps, a.warmup, verify=True)
    ref = a.peers * fb + agg
    print(f"btard_sim: {a.peers} simulated peers, {a.model} ({d:,} parameters), batch {a.batch} per peer, "
          f"{torch.get_num_threads()} intra-op threads\n")
    print("| what | time | vs reference |\n|---|---|---|")
    print(f"| one peer's forward+backward | {fb * 1e3:,.1f} ms | |")
    print(f"| aggregation alone (CenteredClip on {a.peers} parts of [{a.peers}, d/{a.peers}]) | {agg * 1e3:,.1f} ms | |")
    print(f"| reference: {a.peers} x forward+backward + aggregation | {ref * 1e3:,.1f} ms | 1.00x |")
    print(f"| btard_sim step, verify=False | {plain * 1e3:,.1f} ms | **{plain / ref:.2f}x** (target <= 1.30x) |")
    print(f"| btard_sim step, verified, 1 validator | {verified * 1e3:,.1f} ms | {verified / ref:.2f}x ({verified / plain:.2f}x unverified) |")
    for name, phases in (("verify=False", plain_phases), ("verified", verified_phases)):
        print(f"\nphases of the reporting peer's aggregation, {name} (median per step):")
        print("| phase | time |\n|---|---|")
        for k, v in phases.items():
            print(f"| {k} | {v * 1e3:,.1f} ms |")


if __name__ == "__main__":
    main()
