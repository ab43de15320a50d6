"""Leaving a torch.distributed run: rank 0 hosts the process group's TCPStore, which the others need to form each
new group after a ban, so a banned (or finished) rank 0 stays until the others say they are done."""

from __future__ import annotations

import logging
from datetime import timedelta

import torch.distributed as dist

from lightning_btard import compat

__all__ = ["host_the_store_until_the_others_leave", "mark_left"]

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
