"""Leaving the run: a banned peer stops (exit code 0: Lightning's launchers end every rank on a non-zero exit), and at
the end every peer leaves without stranding the others. On torch.distributed rank 0 hosts the process group's TCPStore,
which the others need to form each new group after a ban, so a banned (or finished) rank 0 stays until the others say
they are done; on hivemind a leaving member marks the run finished for peers still asking to join."""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from typing_extensions import override

from lightning_btard import compat
from lightning_btard.protocol.membership import Ban

__all__ = ["Leaving", "host_the_store_until_the_others_leave", "mark_left"]

log = logging.getLogger(__name__)


def mark_left(rank: int) -> None:
    """Tell the process group's store that ``rank`` is done with it."""
    if not dist.is_initialized():
        return
    try:
        compat.default_store().set(f"btard/left/{rank}", "1")
    except Exception as e:  # noqa: BLE001 - the host may be gone already; nothing to tell then
        log.debug("BTARD: could not mark rank %d as left: %s", rank, e)


def host_the_store_until_the_others_leave(rank: int, world_size: int, timeout: timedelta) -> None:
    """On rank 0: wait (idle) until every other rank has marked itself left, or ``timeout``."""
    if rank != 0 or not dist.is_initialized():
        return
    print("BTARD: rank 0 hosts the process group's store; it stays until the other peers have finished.", flush=True)
    keys = [f"btard/left/{r}" for r in range(1, world_size)]
    try:
        compat.default_store().wait(keys, timeout)
    except Exception as e:  # noqa: BLE001 - a peer that crashed never says so: leave after the timeout
        log.warning("BTARD: not every peer finished within the timeout (%s); rank 0 leaves now", e)


class Leaving:
    """Mixed into :class:`~lightning_btard.BTARDStrategy` (which provides the engine, the hivemind peer, the launcher)."""

    engine: Any
    membership: Any
    lightning_module: Any
    global_rank: int
    world_size: int
    _hivemind: Any
    _launcher: Any
    _timeout: timedelta
    _left: bool

    def _leave(self, ban: Ban) -> None:
        """A banned peer stops here, with exit code 0 (the popen launcher kills every process on a non-zero exit)."""
        print(
            f"BTARD: this peer (rank {self.global_rank}) was banned at step {ban.step}: {ban.reason} "
            f"[{ban.evidence}]. Leaving the training.",
            flush=True,
        )
        if self._hivemind is None:
            mark_left(self.global_rank)
        if self.global_rank == 0 and isinstance(self._launcher, compat.MultiProcessingLauncher):
            # the launching process waits for rank 0's result: rank 0 ends fit() here (no more collectives), and
            # hosts the store in teardown until the others have finished
            if self.lightning_module is not None and self.lightning_module._trainer is not None:
                self.lightning_module.trainer.should_stop = True
            return
        if self._hivemind is None:
            host_the_store_until_the_others_leave(self.global_rank, self.world_size, self._timeout)
        sys.stdout.flush()
        sys.stderr.flush()
        self._announce_finished()
        if self._hivemind is not None:
            self._hivemind.shutdown()
        os._exit(0)

    def _announce_finished(self) -> None:
        if self._hivemind is None or self._hivemind.node is None or self._hivemind.joining and self.membership is None:
            return
        module = self.lightning_module
        self._hivemind.announce_finished(module.trainer.global_step if module is not None and module._trainer else 0)

    @override
    def teardown(self) -> None:
        """Leave the swarm after the others have finished their last collective (their records stay readable)."""
        if self._hivemind is None:
            mark_left(self.global_rank)
            if self._left:  # a banned rank 0 that ended fit() early (fork/spawn launchers); the others need the store
                host_the_store_until_the_others_leave(self.global_rank, self.world_size, self._timeout)
        engine = self.engine
        if self._hivemind is not None and engine is not None and engine.broken is None and not engine.left:
            engine.transport.timeout = min(engine.transport.timeout, 60.0)
            try:
                engine.transport.barrier()
            except Exception as e:  # noqa: BLE001 - a peer gone at the end changes nothing for this one
                log.warning("BTARD: final barrier failed (%s); leaving anyway", e)
        self._announce_finished()
        if self._hivemind is not None:
            self._hivemind.shutdown()
        super().teardown()
