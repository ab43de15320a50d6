"""Verifiable batches: peer ``i``'s batch at step ``t`` is a function of ``(run seed, t, i)`` and the dataset alone.

A validator must be able to recompute another peer's gradient, so which samples a peer trains on
and every random draw in producing them (augmentation) derive from ``(run_seed, step, peer,
micro_batch, position)`` only. :class:`VerifiableBatchSampler` yields, for each micro-batch, the keys
of its samples; :class:`VerifiableDataset` wraps any map-style dataset and produces the sample of a
key with the global RNGs (torch, ``random``, NumPy) seeded from it, restoring them afterwards;
:func:`rebuild_batch` is what a validator calls. :func:`step_seed` seeds the random draws of the
training step itself (dropout, masking) the same way.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate

from lightning_btard.protocol.digest import digest

__all__ = [
    "SampleKey",
    "VerifiableBatchSampler",
    "VerifiableDataset",
    "batch_keys",
    "rebuild_batch",
    "step_seed",
]


class SampleKey(NamedTuple):
    """Which sample, for whom, and the seed of its random draws."""

    step: int
    peer: int
    micro: int
    position: int
    index: int


def _seed(*items: Any) -> int:
    return int.from_bytes(digest(*items)[:8], "little") & ((1 << 63) - 1)


def step_seed(run_seed: int, step: int, peer: int, micro: int = 0) -> int:
    """The seed of the random draws of peer ``peer``'s training step ``step`` (micro-batch ``micro``)."""
    return _seed("step", run_seed, step, peer, micro)


def batch_keys(dataset_len: int, batch_size: int, run_seed: int, step: int, peer: int, micro: int = 0) -> list[SampleKey]:
    """The keys of peer ``peer``'s micro-batch ``micro`` at ``step``: ``batch_size`` indices drawn uniformly
    (with replacement, so that the cost does not grow with the dataset) from a generator seeded by the key."""
    if dataset_len < 1:
        raise ValueError("a verifiable batch needs a non-empty dataset")
    gen = torch.Generator().manual_seed(_seed("batch", run_seed, step, peer, micro))
    indices = torch.randint(dataset_len, (batch_size,), generator=gen).tolist()
    return [SampleKey(step, peer, micro, pos, idx) for pos, idx in enumerate(indices)]


class VerifiableBatchSampler(Sampler[list[SampleKey]]):
    """Yields the sample keys of consecutive micro-batches of one peer, from step ``start_step`` on.

    Batch ``b`` of the sampler's life is micro-batch ``b % accumulate`` of step ``start_step + b // accumulate``;
    the count carries over epochs. Set ``start_step`` (e.g. to the trainer's step on resume) before iterating.
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        peer: int,
        run_seed: int,
        accumulate: int = 1,
        batches_per_epoch: Optional[int] = None,
        start_step: int = 0,
    ) -> None:
        if batch_size < 1 or accumulate < 1:
            raise ValueError("batch_size and accumulate must be >= 1")
        self.dataset_len, self.batch_size, self.peer, self.run_seed = dataset_len, batch_size, peer, run_seed
        self.accumulate = accumulate
        self.batches_per_epoch = batches_per_epoch or max(1, dataset_len // batch_size)
        self.start_step = start_step
        self._consumed = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for _ in range(self.batches_per_epoch):
            b = self._consumed
            self._consumed += 1
            yield batch_keys(
                self.dataset_len, self.batch_size, self.run_seed,
                self.start_step + b // self.accumulate, self.peer, b % self.accumulate,
            )

    def restart_at(self, step: int) -> None:
        """Continue with micro-batch 0 of ``step`` (after a resume, or to re-align with the trainer)."""
        self.start_step, self._consumed = step, 0


class VerifiableDataset(Dataset):
    """A map-style dataset indexed by :class:`SampleKey`: the sample at ``key.index``, produced with every
    global RNG seeded from the key (augmentations become reproducible), the RNGs restored afterwards."""

    def __init__(self, dataset: Dataset, run_seed: int) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                "verifiable batches need a map-style dataset (with __getitem__ and __len__): an iterable dataset "
                "cannot be rebuilt by a validator. Use a map-style dataset, or BTARDStrategy(verify=False)."
            )
        self.dataset, self.run_seed = dataset, run_seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: SampleKey) -> Any:
        seed = _seed("sample", self.run_seed, key.step, key.peer, key.micro, key.position, key.index)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed & 0xFFFFFFFF)
            try:
                return self.dataset[key.index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def rebuild_batch(
    dataset: VerifiableDataset,
    batch_size: int,
    step: int,
    peer: int,
    micro: int = 0,
    collate_fn: Callable[[list[Any]], Any] = default_collate,
) -> Any:
    """Peer ``peer``'s micro-batch ``micro`` of ``step``, rebuilt from the dataset alone (what a validator does)."""
    keys = batch_keys(len(dataset), batch_size, dataset.run_seed, step, peer, micro)
    return collate_fn([dataset[k] for k in keys])
