"""BTARDStrategy step time against Lightning's DDPStrategy, and verified against unverified BTARD, in one run.

    ./run bench strategy_step                   # ResNet18, 4 CPU processes
    ./run bench strategy_step --model SmallCNN

Targets: unverified BTARD <= 1.15x DDP; verified (the default: signed round, MPRNG, projection check,
one validator per step) <= 1.25x unverified. Each strategy trains for ``--steps`` steps on random
CIFAR-shaped tensors; the median step time after ``--warmup`` steps is taken on rank 0 (forward,
backward, aggregation and optimizer step), with the median time of each protocol phase.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_btard.lightning_package import pl


def round_metrics(strategy) -> dict:
    """The last step's engine metrics: BTARDStrategy's engine, or the reporting peer's of BTARDSimStrategy."""
    engine = getattr(strategy, "engine", None)
    reporter = getattr(strategy, "reporter", None)
    if engine is None and reporter is not None:
        engine = reporter.engine
    return dict(getattr(engine, "metrics", {}) or {})


class StepTimer(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out, self.times, self.phases, self._t = out, [], [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t)
        metrics = round_metrics(trainer.strategy)
        self.phases.append({k[5:]: v for k, v in metrics.items() if k.startswith("time_")})

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            Path(self.out).write_text(json.dumps({"times": self.times, "phases": self.phases}))


def child(a: argparse.Namespace) -> None:
    import models
    from lightning_btard import BTARDStrategy

    pl.seed_everything(0)
    model = getattr(models, a.model)(cosine_schedule=False)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(a.steps * a.batch * 2, 3, 32, 32, generator=g), torch.randint(0, 10, (a.steps * a.batch * 2,), generator=g))
    if a.strategy == "ddp":
        strategy = "ddp"
    else:
        strategy = BTARDStrategy(tau=a.tau, check_params_every=10**9, verify=a.strategy == "btard-verified")
    trainer = pl.Trainer(
        accelerator="cpu", devices=a.world, strategy=strategy, max_steps=a.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[StepTimer(a.out)],
    )
    trainer.fit(model, DataLoader(data, batch_size=a.batch, shuffle=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="ResNet18")
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--strategy", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.strategy is not None:
        return child(a)
    results, phases = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in ("ddp", "btard", "btard-verified"):
            out = os.path.join(tmp, f"{strategy}.json")
            cmd = [sys.executable, __file__, "--model", a.model, "--world", str(a.world), "--steps", str(a.steps),
                   "--batch", str(a.batch), "--tau", str(a.tau), "--strategy", strategy, "--out", out]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=3600)
            run = json.loads(Path(out).read_text())
            results[strategy] = statistics.median(run["times"][a.warmup :])
            steps = run["phases"][a.warmup :]
            phases[strategy] = {k: statistics.median(s.get(k, 0.0) for s in steps) for k in (steps[-1] if steps else {})}
    ddp, plain, verified = results["ddp"], results["btard"], results["btard-verified"]
    print(f"BTARDStrategy vs DDPStrategy: {a.model}, {a.world} CPU processes, batch {a.batch} per peer, tau={a.tau}\n")
    print("| strategy | median step | vs DDP | vs unverified BTARD |\n|---|---|---|---|")
    print(f"| DDPStrategy | {ddp * 1e3:,.1f} ms | 1.00x | |")
    print(f"| BTARDStrategy(verify=False) | {plain * 1e3:,.1f} ms | {plain / ddp:.2f}x | 1.00x |")
    print(f"| BTARDStrategy() (verified, 1 validator) | {verified * 1e3:,.1f} ms | {verified / ddp:.2f}x | {verified / plain:.2f}x |")
    for strategy in ("btard", "btard-verified"):
        print(f"\nphases of {strategy} (median per step on rank 0):")
        print("| phase | time |\n|---|---|")
        for k, v in phases[strategy].items():
            print(f"| {k} | {v * 1e3:,.1f} ms |")


if __name__ == "__main__":
    main()
