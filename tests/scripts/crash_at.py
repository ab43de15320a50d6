"""A callback that kills its own process (SIGKILL: no cleanup, like a machine that goes away) at a given step."""

from __future__ import annotations

import os
import signal

from lightning_btard.lightning_package import pl


class CrashAt(pl.Callback):
    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            print(f"crash_at: rank {self.rank} kills itself at step {self.step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
