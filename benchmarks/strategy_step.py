"""BTARDStrategy step time and memory against Lightning's DDPStrategy, and verified against unverified BTARD, in one run.

    ./run bench strategy_step                                  # both models, 4 CPU processes, batch 8
    ./run bench strategy_step --models torchvision_resnet18 --rounds 1
    ./run bench strategy_step_gpu                              # the same on GPUs (NCCL, one process per GPU)

Models: ``torchvision_resnet18`` is torchvision's ``resnet18(num_classes=10)`` as a user brings it (ImageNet stem,
on CIFAR-sized inputs), in a plain LightningModule; ``ResNet18`` is this project's CIFAR variant (``models/``).

Targets (issue 16): unverified BTARD (CenteredClip, tau=1) <= 1.10x DDP; verified (the default: signed round, MPRNG,
projection check, one validator per step) <= 1.25x unverified; peak memory per peer, verified, <= 1.3x DDP's.
Each strategy trains ``--steps`` steps on random CIFAR-shaped tensors; the median step time after ``--warmup`` steps
is taken on rank 0 (forward, backward, aggregation and optimizer step), with the median of each protocol phase. The
strategies run interleaved, ``--rounds`` times each, and the best round of each counts (the least disturbed). Peak
memory is each rank's maximum resident set (CPU) or the CUDA allocator's peak (GPU), the largest over ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_btard.lightning_package import pl

STRATEGIES = ("ddp", "btard", "btard-verified")
LABELS = {"ddp": "DDPStrategy", "btard": "BTARDStrategy(verify=False)", "btard-verified": "BTARDStrategy() (verified, 1 validator)"}


def round_metrics(strategy) -> dict:
    """The last step's engine metrics: BTARDStrategy's engine, or the reporting peer's of BTARDSimStrategy."""
    engine = getattr(strategy, "engine", None)
    reporter = getattr(strategy, "reporter", None)
    if engine is None and reporter is not None:
        engine = reporter.engine
    return dict(getattr(engine, "metrics", {}) or {})


class StepTimer(pl.Callback):
    """Step times and phase times on rank 0; every rank writes its peak memory."""

    def __init__(self, out: str) -> None:
        self.out, self.times, self.phases, self._t = out, [], [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)
        metrics = round_metrics(trainer.strategy)
        self.phases.append({k[5:]: v for k, v in metrics.items() if k.startswith("time_")})

    def on_train_end(self, trainer, pl_module):
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
        Path(f"{self.out}.mem{trainer.global_rank}").write_text(str(peak))
        if trainer.global_rank == 0:
            Path(self.out).write_text(json.dumps({"times": self.times, "phases": self.phases}))


class TorchvisionResNet18(pl.LightningModule):
    """torchvision's resnet18 as a user brings it: cross-entropy, SGD with momentum, nothing BTARD-specific."""

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        self.net = torchvision.models.resnet18(num_classes=10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)


def make_model(name: str) -> pl.LightningModule:
    if name == "torchvision_resnet18":
        return TorchvisionResNet18()
    import models

    return getattr(models, name)(cosine_schedule=False)


def child(a: argparse.Namespace) -> None:
    from lightning_btard import BTARDStrategy

    pl.seed_everything(0)
    model = make_model(a.model)
    g = torch.Generator().manual_seed(0)
    n = a.steps * a.batch * 2
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    if a.strategy == "ddp":
        strategy = "ddp"
    else:
        strategy = BTARDStrategy(tau=a.tau, check_params_every=10**9, verify=a.strategy == "btard-verified",
                                 directions=a.directions)
    trainer = pl.Trainer(
        accelerator=a.accelerator, devices=a.world, strategy=strategy, max_steps=a.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[StepTimer(a.out)],
    )
    trainer.fit(model, DataLoader(data, batch_size=a.batch, shuffle=True))


def run_one(a: argparse.Namespace, model: str, strategy: str, tmp: str, round_: int) -> tuple[float, dict, int]:
    out = os.path.join(tmp, f"{model}-{strategy}-{round_}.json")
    cmd = [sys.executable, __file__, "--model", model, "--world", str(a.world), "--steps", str(a.steps),
           "--batch", str(a.batch), "--tau", str(a.tau), "--directions", str(a.directions), "--accelerator", a.accelerator, "--strategy", strategy, "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONWARNINGS": "ignore"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=3600)
    run = json.loads(Path(out).read_text())
    steps = run["phases"][a.warmup:]
    phases = {k: statistics.median(s.get(k, 0.0) for s in steps) for k in (steps[-1] if steps else {})}
    peak = max(int(p.read_text()) for p in Path(tmp).glob(f"{Path(out).name}.mem*"))
    return statistics.median(run["times"][a.warmup:]), phases, peak


def report(a: argparse.Namespace, model: str, results: dict) -> None:
    ddp, plain, verified = (results[s][0] for s in STRATEGIES)
    mem = {s: results[s][2] / 2**20 for s in STRATEGIES}
    where = f"{a.world} {'GPUs' if a.accelerator == 'gpu' else 'CPU processes'}"
    print(f"\n### {model}: {where}, batch {a.batch} per peer, tau={a.tau}, {a.directions} direction(s) per part, "
          f"best of {a.rounds} interleaved round(s)\n")
    print("| strategy | median step | vs DDP | vs unverified BTARD | peak memory per peer | vs DDP |\n|---|---|---|---|---|---|")
    print(f"| {LABELS['ddp']} | {ddp * 1e3:,.1f} ms | 1.00x | | {mem['ddp']:,.0f} MiB | 1.00x |")
    print(f"| {LABELS['btard']} | {plain * 1e3:,.1f} ms | **{plain / ddp:.2f}x** (target <= 1.10x) | 1.00x | "
          f"{mem['btard']:,.0f} MiB | {mem['btard'] / mem['ddp']:.2f}x |")
    print(f"| {LABELS['btard-verified']} | {verified * 1e3:,.1f} ms | {verified / ddp:.2f}x | **{verified / plain:.2f}x** "
          f"(target <= 1.25x) | {mem['btard-verified']:,.0f} MiB | **{mem['btard-verified'] / mem['ddp']:.2f}x** (target <= 1.3x) |")
    for strategy in ("btard", "btard-verified"):
        print(f"\nphases of {LABELS[strategy]} (median per step on rank 0):")
        print("| phase | time |\n|---|---|")
        for k, v in results[strategy][1].items():
            print(f"| {k} | {v * 1e3:,.1f} ms |")


def main(argv=None, accelerator: str = "cpu") -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="torchvision_resnet18,ResNet18", help="comma-separated: torchvision_resnet18, ResNet18, SmallCNN")
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--directions", type=int, default=2, help="secret directions per part in the verified check (fewer: a cheaper, weaker check)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved runs of each strategy; the best counts")
    p.add_argument("--accelerator", default=accelerator, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--strategy", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.strategy is not None:
        return child(a)
    for model in a.models.split(","):
        best: dict = {}
        with tempfile.TemporaryDirectory() as tmp:
            for round_ in range(a.rounds):
                for strategy in STRATEGIES:
                    result = run_one(a, model, strategy, tmp, round_)
                    if strategy not in best or result[0] < best[strategy][0]:
                        best[strategy] = result
        report(a, model, best)


if __name__ == "__main__":
    main()
