"""A Callback for CLI runs in tests: every rank saves what ``tests/procs.load_run`` reads.

    btard fit ... --trainer.callbacks+=record_run.RecordRun --trainer.callbacks.out_dir=DIR   (PYTHONPATH: tests/scripts)

``params{rank}.pt``: the final parameters; ``metrics{rank}.json``: the final callback metrics, the global step,
the training loss of every batch as ``[step, loss]`` pairs, the strategy's bans and departed peers.
"""

from __future__ import annotations

import json
import os

from lightning_btard.lightning_package import pl
import torch


class RecordRun(pl.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.losses: list[list[float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.losses.append([trainer.global_step, float(loss)])

    def on_train_end(self, trainer, pl_module) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        rank = trainer.global_rank
        params = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
        torch.save(params, os.path.join(self.out_dir, f"params{rank}.pt"))
        record = {
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "global_step": trainer.global_step,
            "losses": self.losses,
            "bans": [b.as_dict() for b in getattr(trainer.strategy, "bans", [])],
            "departed": getattr(trainer.strategy, "departed", {}),
        }
        with open(os.path.join(self.out_dir, f"metrics{rank}.json"), "w") as f:
            json.dump(record, f)
