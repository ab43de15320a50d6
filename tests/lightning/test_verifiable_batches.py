"""Verifiable batches: a peer's batch at a step, augmentation included, is rebuilt from the dataset alone."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from datamodules import CIFAR10DataModule, write_synthetic_cifar10
from lightning_btard.verifiable_batches import (
    SampleKey,
    VerifiableBatchSampler,
    VerifiableDataset,
    batch_keys,
    rebuild_batch,
    step_seed,
    verifiable_loader,
)


@pytest.fixture(scope="module")
def augmented_train_set(tmp_path_factory):
    root = write_synthetic_cifar10(tmp_path_factory.mktemp("cifar"), n_train=300, n_test=50, seed=1)
    dm = CIFAR10DataModule(data_dir=str(root), download=False, augment=True)
    dm.setup("fit")
    return dm.train_dataloader().dataset


def test_keys_are_a_function_of_seed_step_peer_micro() -> None:
    a = batch_keys(1000, 8, run_seed=7, step=3, peer=2, micro=1)
    assert a == batch_keys(1000, 8, run_seed=7, step=3, peer=2, micro=1)
    assert [k.index for k in a] != [k.index for k in batch_keys(1000, 8, 7, 3, 3, 1)]  # another peer
    assert [k.index for k in a] != [k.index for k in batch_keys(1000, 8, 7, 4, 2, 1)]  # another step
    assert [k.index for k in a] != [k.index for k in batch_keys(1000, 8, 8, 3, 2, 1)]  # another run
    assert all(0 <= k.index < 1000 and (k.step, k.peer, k.micro) == (3, 2, 1) for k in a)
    assert [k.position for k in a] == list(range(8))
    assert step_seed(7, 3, 2) != step_seed(7, 3, 1) != step_seed(7, 4, 2)


def test_sampler_counts_steps_and_micro_batches_across_epochs() -> None:
    s = VerifiableBatchSampler(dataset_len=100, batch_size=4, peer=1, run_seed=0, accumulate=2, batches_per_epoch=3)
    first = list(s)
    second = list(s)
    got = [(b[0].step, b[0].micro) for b in first + second]
    # Lightning steps at an epoch's last batch even mid-accumulation: the next epoch starts a new step
    assert got == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (3, 0)]
    assert len(s) == 3
    trainer_step = [10]
    s = VerifiableBatchSampler(100, 4, peer=1, run_seed=0, accumulate=2, batches_per_epoch=3, step_source=lambda: trainer_step[0])
    assert [(b[0].step, b[0].micro) for b in s] == [(10, 0), (10, 1), (11, 0)]
    trainer_step[0] = 15  # e.g. an epoch cut short by limit_train_batches: the trainer's step wins
    assert next(iter(s))[0].step == 15


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_batches_equal_a_validators_rebuild_with_augmentation(augmented_train_set, num_workers) -> None:
    plain = DataLoader(augmented_train_set, batch_size=6, shuffle=True, num_workers=num_workers)
    step = [0]
    loader = verifiable_loader(plain, run_seed=42, peer=3, accumulate=2, step_source=lambda: step[0])
    assert len(loader) == len(plain)
    batches = []
    for b, batch in enumerate(loader):
        batches.append(batch)
        if b == 7:
            break
    ds = loader.dataset
    for b, (x, y) in enumerate(batches):
        rx, ry = rebuild_batch(ds, 6, step=b // 2, peer=3, micro=b % 2)
        assert torch.equal(x, rx) and torch.equal(y, ry)
    # augmentation is really random across keys: the same image index under two keys differs
    key = batch_keys(len(ds), 6, 42, 0, 3, 0)[0]
    other = key._replace(step=99)
    assert ds[key][0] == key
    assert not torch.equal(ds[key][1][0], ds[other][1][0])


def test_global_rngs_are_left_as_they_were(augmented_train_set) -> None:
    ds = VerifiableDataset(augmented_train_set, run_seed=1)
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    expected = (torch.rand(1), random.random(), np.random.rand())
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    ds[batch_keys(len(ds), 1, 1, 0, 0)[0]]
    assert (torch.rand(1), random.random(), np.random.rand()) == expected


class _ThreeRngs(torch.utils.data.Dataset):
    """Each sample draws from torch's, Python's and NumPy's global RNGs (as augmentations do); index 13 fails."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int):
        if i == 13:
            raise KeyError("a broken sample")
        return i, torch.rand(2), random.random(), float(np.random.rand())


def test_a_batch_is_its_samples_each_seeded_as_torch_manual_seed_would() -> None:
    """The batched path (what the loader and a validator use) gives each sample exactly what the RNGs seeded from its
    key by torch's own ``manual_seed``, ``random.seed`` and ``np.random.seed`` give, and the one-sample path agrees."""
    from lightning_btard.verifiable_batches import _seed

    ds = VerifiableDataset(_ThreeRngs(), run_seed=9)
    keys = [k for k in batch_keys(len(ds), 16, 9, step=4, peer=1) if k.index != 13]
    batch = ds.__getitems__(keys)
    for key, (got_key, (i, t, r, n)) in zip(keys, batch):
        seed = _seed("sample", 9, key.step, key.peer, key.micro, key.position, key.index)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        assert got_key == key and i == key.index
        assert torch.equal(t, torch.rand(2)) and r == random.random() and n == float(np.random.rand())
        one_key, (_, t1, r1, n1) = ds[key]
        assert torch.equal(t1, t) and (r1, n1) == (r, n)
    assert len({float(b[1][1][0]) for b in batch}) == len(batch)  # the draws really differ from sample to sample


def test_a_batch_leaves_the_global_rngs_as_they_were_even_when_a_sample_fails() -> None:
    ds = VerifiableDataset(_ThreeRngs(), run_seed=9)
    keys = [SampleKey(0, 0, 0, 0, 3), SampleKey(0, 0, 0, 1, 13)]

    def draws():
        return torch.rand(1), random.random(), np.random.rand()

    for run in (lambda: ds.__getitems__(keys[:1]), lambda: ds.__getitems__(keys)):
        torch.manual_seed(5)
        random.seed(5)
        np.random.seed(5)
        expected = draws()
        torch.manual_seed(5)
        random.seed(5)
        np.random.seed(5)
        try:
            run()
        except KeyError:
            pass
        assert draws() == expected


def test_iterable_datasets_are_refused_with_a_clear_error() -> None:
    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(3)

    with pytest.raises(TypeError, match="map-style"):
        VerifiableDataset(Stream(), run_seed=0)


def test_random_draws_in_the_collate_function_are_rebuilt() -> None:
    """Masking in a collate function (as for masked language modelling) is seeded by the micro-batch."""

    def masking_collate(samples):
        x = torch.stack([s[0] for s in samples])
        return x, torch.rand(x.shape) < 0.15

    data = TensorDataset(torch.randn(40, 5), torch.zeros(40))
    loader = verifiable_loader(DataLoader(data, batch_size=4, collate_fn=masking_collate), 3, peer=1, accumulate=1, step_source=lambda: 7)
    first = next(iter(loader))
    again = rebuild_batch(loader.dataset, 4, step=7, peer=1, micro=0, collate_fn=loader.collate_fn)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    other = rebuild_batch(loader.dataset, 4, step=8, peer=1, micro=0, collate_fn=masking_collate)
    assert not torch.equal(first[1], other[1])


def test_loaders_without_a_batch_size_are_refused() -> None:
    data = TensorDataset(torch.randn(8, 2))
    with pytest.raises(TypeError, match="batch_size"):
        verifiable_loader(DataLoader(data, batch_size=None), 0, 0, 1, lambda: 0)
