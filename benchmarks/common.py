"""Shared helpers for the benchmarks: timing by repetition, side by side in one process."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def best_of(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds over ``repeat`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def row(name: str, seconds: float, ref: float, note: str = "") -> str:
    return f"| {name} | {seconds * 1e3:,.1f} ms | {seconds / ref:,.1f}x | {note} |"


def spawn_ranks(worker: Callable[..., None], world: int, *args: object, timeout: float = 900.0) -> object:
    """Run ``worker(rank, world, port, *args, queue)`` in ``world`` spawned processes (a free loopback port for the
    process group) and return what rank 0 puts on ``queue``; the processes are joined, or killed if they hang."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, port, *args, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    try:
        return queue.get(timeout=timeout)
    finally:
        for proc in procs:
            proc.join(60)
            if proc.is_alive():
                proc.kill()
