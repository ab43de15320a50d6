"""Test helpers: n peers of one transport as threads of this process."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Callable, Optional

from lightning_btard.transports.base import Transport, TransportError
from lightning_btard.transports.in_process import InProcessHub, InProcessTransport

__all__ = ["run_in_threads", "run_peers"]


def run_in_threads(
    transports: Sequence[Transport], fn: Callable[[Transport], Any], timeout: float, on_error: Callable[[], None] = lambda: None
) -> list[Any]:
    """Run ``fn(transport)`` for each transport in its own thread; results in order.

    A non-transport exception on any peer is re-raised (a bug, not a network fault); transport errors are
    reported together, every peer's view in one message (the first may only be a consequence of another's).
    """
    n = len(transports)
    results: list[Any] = [None] * n
    errors: list[Optional[BaseException]] = [None] * n

    def target(rank: int) -> None:
        try:
            results[rank] = fn(transports[rank])
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            errors[rank] = e
            on_error()

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * 4)
    for rank, e in enumerate(errors):
        if e is not None and not isinstance(e, TransportError):
            raise RuntimeError(f"peer {rank} failed: {e!r}") from e
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed:
        raise TransportError("\n".join(f"peer {rank}: {e}" for rank, e in failed)) from failed[0][1]
    if any(t.is_alive() for t in threads):
        raise TransportError("peers did not finish")
    return results


def run_peers(n: int, fn: Callable[[Transport], Any], timeout: float = 60.0) -> list[Any]:
    """Run ``fn(transport)`` on ``n`` in-process peers (threads); return their results in rank order.

    An exception on any peer is re-raised here (after the others stop or time out).
    """
    hub = InProcessHub(n, timeout)
    return run_in_threads([InProcessTransport(hub, r) for r in range(n)], fn, timeout, on_error=hub.barrier.abort)
