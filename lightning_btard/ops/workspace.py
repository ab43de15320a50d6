"""Reusable per-thread buffers.

On a CPU, a fresh block of tens of megabytes is mapped from the OS and page-faulted on first touch,
which costs more than the arithmetic done in it (about 60 ms for 45 MB on the machine we measure
on, against under 1 ms to read it). Code that runs every step with the same shapes (CenteredClip,
the transports, the strategy's flat gradient) keeps its large buffers here instead.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

__all__ = ["SCRATCH", "Workspace"]


class Workspace(threading.local):
    """Named buffers, per thread; a name keeps its few most recently used shapes (a round uses one or two)."""

    SHAPES_PER_NAME = 3

    def __init__(self) -> None:
        self.buffers: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def __reduce__(self) -> tuple:
        """Pickled (a strategy sent to spawned processes) as an empty workspace: buffers are only a cache."""
        return (self.__class__, ())

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` (contents are whatever the previous user left)."""
        key = (name, tuple(shape), dtype, torch.device(device))
        buf = self.buffers.get(key)
        if buf is None:
            same_name = [k for k in self.buffers if k[0] == name]
            for old in same_name[: max(0, len(same_name) - self.SHAPES_PER_NAME + 1)]:
                del self.buffers[old]
            buf = self.buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        self.buffers.move_to_end(key)
        return buf

    def view(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised ``shape`` view of one buffer per ``name`` (and dtype, device), grown to the largest shape
        asked for: callers of different shapes that never hold it at the same time share its memory."""
        numel = 1
        for size in shape:
            numel *= int(size)
        key = (name, "view", dtype, torch.device(device))
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            self.buffers.pop(key, None)  # free the smaller one first
            buf = self.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


SCRATCH = Workspace()
"""Scratch shared by uses that never overlap in one thread: ``"rows"``, CenteredClip's chunk of centred rows and the
projections' chunk of differences (about 1 MB per thread on a CPU; the whole ``[n, part]`` only on CenteredClip's rare
paths, rows beyond float32's range, and on a GPU, where a chunk is the whole row); ``"vector"``, a round's or a
validation's secret directions (``[k, part]``, held through the verify phase or the validation check). One buffer of
each per thread."""
