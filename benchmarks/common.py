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
