"""N BTARD peers simulated in one process: their batches, their attack callbacks, their engines and their threads.

What :class:`~lightning_btard.sim_strategy.BTARDSimStrategy` runs inside one Lightning process:

- **batches**: one dataloader yields, per step, a :class:`PeerBatches` of every peer's verifiable batch (the batch
  peer ``i`` of an ``N``-process run draws at that step: ``verifiable_batches.py``, from its part of the data when it
  is split), built by the loader's own workers;
- **a peer** (:class:`SimulatedPeer`): its :class:`~lightning_btard.protocol.engine.PeerEngine` over an in-process
  group (the same aggregation code, verification, validation and bans as a process of its own), its own copies of
  the run's attack callbacks (an attack's state, e.g. a delayed gradient's store, is per peer, as in a process of
  its own), and its own module buffers (BatchNorm statistics are each peer's, as in a process of its own);
- **the aggregation phase** (:class:`PeerThreads`): every peer's collectives need the others, so each peer
  runs its attacks and its engine's step in a thread of its own; the gradients before it are computed one peer after
  the other on the one module.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from lightning_btard.attacks.base import Attack
from lightning_btard.protocol.engine import PeerEngine
from lightning_btard.transports.base import TransportError
from lightning_btard.transports.in_process import InProcessHub
from lightning_btard.verifiable_batches import (
    SampleKey,
    VerifiableBatchSampler,
    VerifiableCollate,
    VerifiableDataset,
    worker_options,
)

__all__ = ["PeerBatches", "PeerView", "SimulatedPeer", "ReporterOnly", "PeerThreads", "peer_batches_loader"]

THREAD_PREFIX = "btard-sim-peer-"


class ReporterOnly(logging.Filter):
    """Lets through the protocol's log lines of one simulated peer only (every peer would print each ban), and every
    attacker's attack lines (``lightning_btard.attacks``)."""

    def __init__(self) -> None:
        super().__init__()
        self.reporter: Optional[int] = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.threadName.startswith(THREAD_PREFIX) or record.name.startswith("lightning_btard.attacks"):
            return True
        return record.threadName == f"{THREAD_PREFIX}{self.reporter}"

    def install(self) -> None:
        for name in _protocol_loggers():
            logging.getLogger(name).addFilter(self)

    def remove(self) -> None:
        for name in _protocol_loggers():
            logging.getLogger(name).removeFilter(self)


def _protocol_loggers() -> list[str]:
    return [name for name in list(logging.root.manager.loggerDict)
            if name.startswith("lightning_btard.") and not name.startswith("lightning_btard.attacks")]


class PeerBatches(list):
    """One training step's batches, one per simulated peer (index = peer). A list, so that Lightning moves every
    peer's tensors to the device and finds the batch size in the first peer's batch."""


class PeerView:
    """The trainer as simulated peer ``rank`` sees it: ``global_rank`` and ``world_size`` are the peer's (attacks
    decide by them); everything else is the trainer's."""

    def __init__(self, trainer: Any, rank: int, world_size: int) -> None:
        self.__dict__.update(_trainer=trainer, global_rank=rank, world_size=world_size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_trainer"], name)


class SimulatedPeer:
    """One simulated peer: its engine, its attacks, its buffers, and what it does in the current step."""

    def __init__(self, rank: int, engine: PeerEngine, attacks: list[Attack]) -> None:
        self.rank, self.engine, self.attacks = rank, engine, attacks
        self.buffers: Optional[list[Tensor]] = None
        """This peer's copy of the module's buffers (``None``: the module has none)."""
        self.task: Any = None
        """This step's validation task (``engine.begin_step``): its gradient is then the target's, recomputed."""
        self.counts: dict[str, float] = {}

    @property
    def left(self) -> bool:
        return self.engine.left

    def load_buffers(self, module: torch.nn.Module) -> None:
        if self.buffers is not None:
            with torch.no_grad():
                torch._foreach_copy_(list(module.buffers()), self.buffers)

    def save_buffers(self, module: torch.nn.Module) -> None:
        current = [b.detach() for b in module.buffers()]
        if not current:
            return
        if self.buffers is None:
            self.buffers = [b.clone() for b in current]
        else:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, current)


class _PeersBatchSampler(Sampler[list[SampleKey]]):
    """The keys of every peer's batch of a step, concatenated in peer order."""

    def __init__(self, samplers: Sequence[VerifiableBatchSampler]) -> None:
        self.samplers = list(samplers)

    def __len__(self) -> int:
        return len(self.samplers[0])

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for keys in zip(*self.samplers):
            yield [k for peer_keys in keys for k in peer_keys]


class _PeersCollate:
    """Collates each peer's items on its own (the collate's RNGs seeded from the peer's micro-batch, as the peer's own
    loader does): :class:`PeerBatches`."""

    def __init__(self, collate: VerifiableCollate, peers: int) -> None:
        self.collate, self.peers = collate, peers

    def __call__(self, items: list[tuple[SampleKey, Any]]) -> PeerBatches:
        size = len(items) // self.peers
        return PeerBatches(self.collate(items[i * size:(i + 1) * size]) for i in range(self.peers))


def peer_batches_loader(dataloader: DataLoader, run_seed: int, peers: int, step_source: Callable[[], int],
                        parts: Optional[Sequence[Sequence[int]]] = None) -> DataLoader:
    """One loader of :class:`PeerBatches`: at each step, the batch each of ``peers`` peers draws (the same keys, samples
    and collation as its own verifiable loader), over ``dataloader``'s dataset, batch size, collate function and
    workers. An epoch is as many steps as one peer's epoch in a run of ``peers`` processes (Lightning's distributed
    sampler gives each a ``1/peers`` share of the dataset)."""
    if not isinstance(dataloader, DataLoader):
        raise TypeError(f"btard_sim needs its training data as a torch DataLoader over a map-style dataset, got {type(dataloader).__name__}")
    dataset = VerifiableDataset(dataloader.dataset, run_seed)
    batch_size = dataloader.batch_size or getattr(dataloader.batch_sampler, "batch_size", None)
    if not batch_size:
        raise TypeError("btard_sim needs a training DataLoader with a batch_size (a custom batch_sampler cannot be rebuilt)")
    share = math.ceil(len(dataset) / peers)
    drop_last = bool(getattr(dataloader.batch_sampler, "drop_last", False))
    per_epoch = max(1, share // batch_size if drop_last else math.ceil(share / batch_size))
    samplers = [VerifiableBatchSampler(len(dataset), batch_size, peer, run_seed, 1, batches_per_epoch=per_epoch,
                                       step_source=step_source, parts=parts) for peer in range(peers)]
    return DataLoader(
        dataset,
        batch_sampler=_PeersBatchSampler(samplers),
        collate_fn=_PeersCollate(VerifiableCollate(dataloader.collate_fn, run_seed), peers),
        **worker_options(dataloader),
    )


class PeerThreads:
    """One long-lived thread per simulated peer, which runs that peer's part of every step: the peers' collectives need
    each other, and a peer's thread-local workspaces (``ops/workspace.py``) stay allocated from one step to the next.

    :meth:`run` calls ``fn(peer)`` for the given peers, each in its own thread, and returns their results in order. An
    error on one peer breaks the others' collectives (they stop at once instead of waiting out the timeout); the first
    error that is not such a consequence is raised."""

    def __init__(self, hub: InProcessHub) -> None:
        self.hub = hub
        self._queues: dict[int, queue.SimpleQueue] = {}
        self._threads: list[threading.Thread] = []

    def run(self, peers: Sequence[SimulatedPeer], fn: Callable[[SimulatedPeer], Any]) -> list[Any]:
        done: queue.SimpleQueue = queue.SimpleQueue()
        # the peers' threads share the cores: each runs its tensor ops on its share of the intra-op threads (a
        # per-thread setting), not on all of them (N times the cores' threads, fighting)
        threads_each = max(1, torch.get_num_threads() // max(1, len(peers)))
        for i, peer in enumerate(peers):
            self._queue_of(peer.rank).put((i, peer, fn, threads_each, done))
        results: list[Any] = [None] * len(peers)
        errors: list[BaseException] = []
        for _ in peers:
            i, ok, value = done.get()
            if ok:
                results[i] = value
            else:
                errors.append(value)
        if errors:
            raise next((e for e in errors if not isinstance(e, TransportError)), errors[0])
        return results

    def close(self) -> None:
        for q in self._queues.values():
            q.put(None)
        for t in self._threads:
            t.join(timeout=10)
        self._queues.clear()
        self._threads.clear()

    def _queue_of(self, rank: int) -> queue.SimpleQueue:
        if rank not in self._queues:
            q: queue.SimpleQueue = queue.SimpleQueue()
            t = threading.Thread(target=self._serve, args=(q,), name=f"{THREAD_PREFIX}{rank}", daemon=True)
            self._queues[rank] = q
            self._threads.append(t)
            t.start()
        return self._queues[rank]

    def _serve(self, q: queue.SimpleQueue) -> None:
        while True:
            job = q.get()
            if job is None:
                return
            i, peer, fn, threads_each, done = job
            try:
                torch.set_num_threads(threads_each)
                done.put((i, True, fn(peer)))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                _abort(self.hub)
                done.put((i, False, e))


def _abort(hub: InProcessHub) -> None:
    """Break the barriers of ``hub`` and of every group made from it, so that no simulated peer waits for one that
    failed."""
    hub.barrier.abort()
    with hub.lock:
        children = list(hub.children.values())
    for child in children:
        _abort(child)
