"""BTARDStrategy step time against Lightning's DDPStrategy, same model, data and processes, in one run.

    ./run bench strategy_step                   # ResNet18, 4 CPU processes (target: <= 1.15x)
    ./run bench strategy_step --model SmallCNN

Each strategy trains for ``--steps`` steps on random CIFAR-shaped tensors; the median step time
after ``--warmup`` steps is taken on rank 0 (forward, backward, aggregation and optimizer step).
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

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class StepTimer(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out, self.times, self._t = out, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            Path(self.out).write_text(json.dumps(self.times))


def child(a: argparse.Namespace) -> None:
    import models
    from lightning_btard import BTARDStrategy

    pl.seed_everything(0)
    model = getattr(models, a.model)(cosine_schedule=False)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(a.steps * a.batch * 2, 3, 32, 32, generator=g), torch.randint(0, 10, (a.steps * a.batch * 2,), generator=g))
    strategy = BTARDStrategy(tau=a.tau, check_params_every=10**9) if a.strategy == "btard" else "ddp"
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
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in ("ddp", "btard"):
            out = os.path.join(tmp, f"{strategy}.json")
            cmd = [sys.executable, __file__, "--model", a.model, "--world", str(a.world), "--steps", str(a.steps),
                   "--batch", str(a.batch), "--tau", str(a.tau), "--strategy", strategy, "--out", out]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=3600)
            results[strategy] = statistics.median(json.loads(Path(out).read_text())[a.warmup :])
    print(f"BTARDStrategy vs DDPStrategy: {a.model}, {a.world} CPU processes, batch {a.batch} per peer, tau={a.tau}\n")
    print("| strategy | median step | ratio |\n|---|---|---|")
    print(f"| DDPStrategy | {results['ddp'] * 1e3:,.1f} ms | 1.00x |")
    print(f"| BTARDStrategy | {results['btard'] * 1e3:,.1f} ms | {results['btard'] / results['ddp']:.2f}x |")


if __name__ == "__main__":
    main()
