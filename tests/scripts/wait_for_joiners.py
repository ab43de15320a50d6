"""A Callback for hivemind CLI runs in tests: at ``step``, every member waits until ``count`` join requests are in the
DHT (or ``timeout``), so that a test of admissions does not race the joiners' start-up against the members' steps.

    btard fit ... --trainer.callbacks+=wait_for_joiners.WaitForJoiners --trainer.callbacks.step=10 ...
"""

from __future__ import annotations

import time

from lightning_btard.lightning_package import pl

from lightning_btard.groups.hivemind_admission import _join_requests


class WaitForJoiners(pl.Callback):
    def __init__(self, step: int, count: int = 1, timeout: float = 180.0) -> None:
        self.step, self.count, self.timeout = step, count, timeout

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        peer = trainer.strategy._hivemind
        if trainer.global_step != self.step or peer is None or peer.node is None or peer.catching_up or peer.joining:
            return
        deadline = time.monotonic() + self.timeout
        while len(_join_requests(peer.node, peer.run_id)) < self.count and time.monotonic() < deadline:
            time.sleep(0.5)
