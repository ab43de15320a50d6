"""Verifiable batches: peer ``i``'s batch at step ``t`` is a function of ``(run seed, t, i)`` and the dataset alone.

A validator must be able to recompute another peer's gradient, so which samples a peer trains on
and every random draw in producing them derive from ``(run_seed, step, peer, micro_batch)`` only:

- :class:`VerifiableBatchSampler` yields, for each micro-batch, the keys of its samples;
- :class:`VerifiableDataset` wraps any map-style dataset and produces ``(key, sample)`` with the
  global RNGs (torch, ``random``, NumPy) seeded from the key (augmentation), restoring them afterwards;
- :class:`VerifiableCollate` collates with the RNGs seeded from the micro-batch (random masking in a
  collate function, as in masked language modelling);
- :func:`verifiable_loader` turns a training ``DataLoader`` into one that yields exactly these batches
  (what :class:`~lightning_btard.BTARDStrategy` installs), :func:`rebuild_batch` is what a validator
  calls, and :func:`step_seed` seeds the random draws of the training step itself (dropout).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate

from lightning_btard.protocol.digest import digest

__all__ = [
    "SampleKey",
    "VerifiableBatchSampler",
    "VerifiableCollate",
    "VerifiableDataset",
    "batch_keys",
    "data_fingerprint",
    "rebuild_batch",
    "seeded_rngs",
    "seeded_step",
    "step_seed",
    "verifiable_loader",
    "worker_options",
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


def _seed_all(seed: int) -> None:
    """Seed torch's CPU generator (and CUDA's and MPS's where in use), Python's and NumPy's global RNGs from ``seed``.

    What ``torch.manual_seed`` does for the devices this project runs on, without its cost: with CUDA not initialised
    (a CPU run, a data worker) it queues a lazy seed for CUDA, XPU and MTIA, formatting the stack for each, 0.1 to
    1 ms a call; a verified batch seeds once per sample. CUDA not yet initialised has no RNG to draw from (a block that
    draws on it initialises it first, in :func:`seeded_rngs` through ``devices``)."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)


@contextlib.contextmanager
def _rngs_restored(devices: Optional[list[torch.device]] = None) -> Iterator[None]:
    """Run the block, then put torch's (CPU and ``devices``), Python's and NumPy's RNGs back as they were."""
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = [d for d in devices or [] if torch.device(d).type == "cuda"]
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def seeded_rngs(seed: int, devices: Optional[list[torch.device]] = None) -> Iterator[None]:
    """Run the block with torch's (CPU and ``devices``), Python's and NumPy's RNGs seeded from ``seed``; restore them after."""
    with _rngs_restored(devices):
        _seed_all(seed)
        yield


def step_seed(run_seed: int, step: int, peer: int, micro: int = 0) -> int:
    """The seed of the random draws of peer ``peer``'s training step ``step`` (micro-batch ``micro``)."""
    return _seed("step", run_seed, step, peer, micro)


def seeded_step(
    run_seed: int, step: int, peer: int, micro: int = 0, devices: Optional[list[torch.device]] = None
) -> contextlib.AbstractContextManager:
    """The RNGs of peer ``peer``'s training step ``step`` (micro-batch ``micro``): what dropout draws from."""
    return seeded_rngs(step_seed(run_seed, step, peer, micro), devices)


def batch_keys(dataset_len: int, batch_size: int, run_seed: int, step: int, peer: int, micro: int = 0,
               parts: Optional[Sequence[Sequence[int]]] = None) -> list[SampleKey]:
    """The keys of peer ``peer``'s micro-batch ``micro`` at ``step``: ``batch_size`` indices drawn uniformly
    (with replacement, so that the cost does not grow with the dataset) from a generator seeded by the key, from the
    whole dataset or, with a split (``data_splits.py``), from the peer's part ``parts[peer % len(parts)]``."""
    if dataset_len < 1:
        raise ValueError("a verifiable batch needs a non-empty dataset")
    gen = torch.Generator().manual_seed(_seed("batch", run_seed, step, peer, micro))
    if parts is None:
        indices = torch.randint(dataset_len, (batch_size,), generator=gen).tolist()
    else:
        own = parts[peer % len(parts)]
        indices = [int(own[i]) for i in torch.randint(len(own), (batch_size,), generator=gen).tolist()]
    return [SampleKey(step, peer, micro, pos, idx) for pos, idx in enumerate(indices)]


class VerifiableBatchSampler(Sampler[list[SampleKey]]):
    """Yields the sample keys of consecutive micro-batches of one peer.

    Batch ``b`` of an epoch is micro-batch ``b % accumulate`` of step ``start + b // accumulate``, where
    ``start`` is ``step_source()`` when the epoch's iteration begins (the trainer's step: Lightning starts
    every epoch with a fresh accumulation) or, without a source, the step after the previous epoch's last.
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        peer: int,
        run_seed: int,
        accumulate: int = 1,
        batches_per_epoch: Optional[int] = None,
        step_source: Optional[Callable[[], int]] = None,
        parts: Optional[Sequence[Sequence[int]]] = None,
    ) -> None:
        if batch_size < 1 or accumulate < 1:
            raise ValueError("batch_size and accumulate must be >= 1")
        self.dataset_len, self.batch_size, self.peer, self.run_seed = dataset_len, batch_size, peer, run_seed
        self.accumulate = accumulate
        self.batches_per_epoch = batches_per_epoch or max(1, dataset_len // batch_size)
        self.step_source = step_source
        self.parts = parts
        self._next_step = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[SampleKey]]:
        start = self.step_source() if self.step_source is not None else self._next_step
        self._next_step = start + -(-self.batches_per_epoch // self.accumulate)
        for b in range(self.batches_per_epoch):
            yield batch_keys(self.dataset_len, self.batch_size, self.run_seed, start + b // self.accumulate, self.peer,
                             b % self.accumulate, self.parts)


class VerifiableDataset(Dataset):
    """A map-style dataset indexed by :class:`SampleKey`: ``(key, sample at key.index)``, the sample produced
    with every global RNG seeded from the key (augmentations become reproducible), the RNGs restored afterwards."""

    def __init__(self, dataset: Dataset, run_seed: int) -> None:
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                "verifiable batches need a map-style dataset (with __getitem__ and __len__): an iterable dataset "
                "cannot be rebuilt by a validator. Use a map-style dataset, or BTARDStrategy(verify=False)."
            )
        self.dataset, self.run_seed = dataset, run_seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: SampleKey) -> tuple[SampleKey, Any]:
        with seeded_rngs(self._sample_seed(key)):
            return key, self.dataset[key.index]

    def __getitems__(self, keys: Sequence[SampleKey]) -> list[tuple[SampleKey, Any]]:
        """A batch's samples (what a ``DataLoader`` asks for), each exactly as :meth:`__getitem__` gives it: the RNGs
        seeded from its key, but kept and restored once per batch instead of once per sample."""
        with _rngs_restored():
            out = []
            for key in keys:
                _seed_all(self._sample_seed(key))
                out.append((key, self.dataset[key.index]))
            return out

    def _sample_seed(self, key: SampleKey) -> int:
        return _seed("sample", self.run_seed, key.step, key.peer, key.micro, key.position, key.index)


class VerifiableCollate:
    """Collates ``(key, sample)`` items with the wrapped ``collate_fn``, the RNGs seeded from the micro-batch."""

    def __init__(self, collate_fn: Optional[Callable[[list[Any]], Any]], run_seed: int) -> None:
        self.collate_fn = collate_fn or default_collate
        self.run_seed = run_seed

    def __call__(self, items: list[tuple[SampleKey, Any]]) -> Any:
        key = items[0][0]
        with seeded_rngs(_seed("collate", self.run_seed, key.step, key.peer, key.micro)):
            return self.collate_fn([sample for _, sample in items])


def verifiable_loader(
    dataloader: DataLoader, run_seed: int, peer: int, accumulate: int, step_source: Callable[[], int],
    parts: Optional[Sequence[Sequence[int]]] = None,
) -> DataLoader:
    """A ``DataLoader`` over the same dataset, batch size, collate function and workers as ``dataloader``, whose
    batches are peer ``peer``'s verifiable batches (as many per epoch as ``dataloader`` has), drawn from its part of
    ``parts`` when the data is split (``data_splits.py``)."""
    if not isinstance(dataloader, DataLoader):
        raise TypeError(
            f"verify=True needs its training data as a torch DataLoader over a map-style dataset, got {type(dataloader).__name__}"
        )
    dataset = VerifiableDataset(dataloader.dataset, run_seed)
    batch_size = dataloader.batch_size or getattr(dataloader.batch_sampler, "batch_size", None)
    if not batch_size:
        raise TypeError("verify=True needs a training DataLoader with a batch_size (a custom batch_sampler cannot be rebuilt)")
    sampler = VerifiableBatchSampler(
        len(dataset), batch_size, peer, run_seed, accumulate, batches_per_epoch=len(dataloader), step_source=step_source,
        parts=parts,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=VerifiableCollate(dataloader.collate_fn, run_seed),
        **worker_options(dataloader),
    )


def worker_options(dataloader: DataLoader) -> dict[str, Any]:
    """How ``dataloader`` loads (workers, pinning, timeouts): what a loader built in its place keeps."""
    return {
        "num_workers": dataloader.num_workers,
        "pin_memory": dataloader.pin_memory,
        "timeout": dataloader.timeout,
        "worker_init_fn": dataloader.worker_init_fn,
        "multiprocessing_context": dataloader.multiprocessing_context if dataloader.num_workers else None,
        "persistent_workers": dataloader.persistent_workers,
        "prefetch_factor": dataloader.prefetch_factor if dataloader.num_workers else None,
    }


def rebuild_batch(
    dataset: VerifiableDataset,
    batch_size: int,
    step: int,
    peer: int,
    micro: int = 0,
    collate_fn: Optional[Callable[[list[Any]], Any]] = None,
    parts: Optional[Sequence[Sequence[int]]] = None,
) -> Any:
    """Peer ``peer``'s micro-batch ``micro`` of ``step``, rebuilt from the dataset alone (what a validator does).
    ``collate_fn`` is the training loader's (a :class:`VerifiableCollate` or the function it wraps); ``parts`` the
    split, if any."""
    if not isinstance(collate_fn, VerifiableCollate):
        collate_fn = VerifiableCollate(collate_fn, dataset.run_seed)
    keys = batch_keys(len(dataset), batch_size, dataset.run_seed, step, peer, micro, parts)
    return collate_fn(dataset.__getitems__(keys))


def _fingerprint_items(obj: Any) -> Iterator[Any]:
    """The digestible leaves of a sample (tensors, arrays, numbers, strings, bytes, in containers); other objects by
    their type's name only (their ``repr`` may hold a memory address)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, np.ndarray):
        yield torch.from_numpy(np.ascontiguousarray(obj))
    elif isinstance(obj, (bytes, str)) or (isinstance(obj, (int, float)) and not isinstance(obj, bool)):
        yield obj
    elif isinstance(obj, bool):
        yield int(obj)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield str(k)
            yield from _fingerprint_items(obj[k])
    elif isinstance(obj, (list, tuple)):
        yield f"seq{len(obj)}"
        for item in obj:
            yield from _fingerprint_items(item)
    else:
        yield type(obj).__qualname__


def data_fingerprint(dataset: VerifiableDataset, samples: int = 8) -> str:
    """A digest of the training data as a validator would rebuild it: its length and ``samples`` samples at keys drawn
    from the run seed. Peers whose data differ (``seed_everything(rank)`` before a random dataset, an unseeded
    ``random_split``, files listed in another order) get different fingerprints."""
    n = len(dataset)
    items: list[Any] = ["data", n]
    for key in batch_keys(n, samples, dataset.run_seed, step=-1, peer=-1) if n else []:
        items += list(_fingerprint_items(dataset[key][1]))
    return digest(*items).hex()
