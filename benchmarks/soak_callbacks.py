"""Callbacks the swarm soak gives its peers (``benchmarks/swarm_soak.py``; on PYTHONPATH through ``./run bench``).

``SoakControl``: each step, the peer writes its step to ``<default_root_dir>/step``; when ``<run_dir>/stop`` holds a
step, the peer stops there (all peers read it before they reach that step, so they stop together and their
parameters can be compared).
"""

from __future__ import annotations

import os

from lightning_btard.lightning_package import pl


class SoakControl(pl.Callback):
    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        with open(os.path.join(trainer.default_root_dir, "step"), "w") as f:
            f.write(str(step))
        try:
            with open(os.path.join(self.run_dir, "stop")) as f:
                stop = int(f.read().strip() or "0")
        except (OSError, ValueError):
            return
        if stop and step >= stop:
            trainer.should_stop = True
