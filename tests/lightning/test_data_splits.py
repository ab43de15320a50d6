"""Non-IID splits: public and seeded, the label skew they promise, batches drawn from a peer's part, and a
validator's rebuild of another peer's batch from the same split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from lightning_btard.data_splits import DataSplit, dataset_labels
from lightning_btard.errors import UserError
from lightning_btard.verifiable_batches import VerifiableBatchSampler, VerifiableDataset, batch_keys, rebuild_batch

LABELS = np.repeat(np.arange(10), 60)  # 600 samples, 10 classes


def test_splits_cover_the_data_once_and_are_a_function_of_the_seed() -> None:
    for kind in ("iid", "dirichlet", "shards"):
        split = DataSplit(kind=kind, alpha=0.3, shards_per_peer=2, seed=4)
        parts = split.parts(LABELS, 8)
        assert len(parts) == 8
        every = np.concatenate(parts)
        if kind != "dirichlet":  # dirichlet may leave a peer empty (then it gets one random sample)
            assert sorted(every.tolist()) == list(range(600))
        again = DataSplit(kind=kind, alpha=0.3, shards_per_peer=2, seed=4).parts(LABELS, 8)
        assert all(np.array_equal(a, b) for a, b in zip(parts, again))
        other = DataSplit(kind=kind, alpha=0.3, shards_per_peer=2, seed=5).parts(LABELS, 8)
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def label_entropy(parts: list[np.ndarray]) -> float:
    out = []
    for part in parts:
        counts = np.bincount(LABELS[part], minlength=10) / len(part)
        counts = counts[counts > 0]
        out.append(float(-(counts * np.log(counts)).sum()))
    return float(np.mean(out))


def test_dirichlet_skew_grows_as_alpha_shrinks_and_shards_give_few_classes() -> None:
    iid = label_entropy(DataSplit("iid").parts(LABELS, 8))
    mild = label_entropy(DataSplit("dirichlet", alpha=10.0).parts(LABELS, 8))
    skew = label_entropy(DataSplit("dirichlet", alpha=0.1).parts(LABELS, 8))
    assert iid > mild > skew and iid > np.log(10) - 0.1
    shards = DataSplit("shards", shards_per_peer=2).parts(LABELS, 10)  # 20 shards of 30 sorted samples
    assert all(len(np.unique(LABELS[p])) <= 2 for p in shards)


def test_batches_come_from_the_peers_part_and_a_validator_rebuilds_them() -> None:
    data = TensorDataset(torch.arange(600, dtype=torch.float32)[:, None], torch.as_tensor(LABELS))
    parts = DataSplit("shards", shards_per_peer=1).parts(dataset_labels(data), 10)
    for peer in (0, 3, 13):  # 13: a joiner beyond the initial peers takes part 13 % 10
        keys = batch_keys(600, 32, run_seed=7, step=5, peer=peer, parts=parts)
        assert {k.index for k in keys} <= set(parts[peer % 10].tolist())
    sampler = VerifiableBatchSampler(600, 16, peer=2, run_seed=7, batches_per_epoch=3, parts=parts)
    verifiable = VerifiableDataset(data, run_seed=7)
    own = [[verifiable[k][1] for k in keys] for keys in sampler]
    for step, batch in enumerate(own):
        rebuilt = rebuild_batch(verifiable, 16, step, peer=2, parts=parts)
        assert torch.equal(rebuilt[0], torch.stack([b[0] for b in batch]))  # (inputs, labels)
        assert set(rebuilt[1].tolist()) <= set(LABELS[parts[2]].tolist())
    # without the split a validator would rebuild something else: the split is part of what it must know
    assert not torch.equal(rebuild_batch(verifiable, 16, 0, peer=2)[0], rebuild_batch(verifiable, 16, 0, peer=2, parts=parts)[0])


def test_labels_are_read_through_subsets_and_bad_specs_refused() -> None:
    data = TensorDataset(torch.zeros(600, 1), torch.as_tensor(LABELS))
    sub = Subset(data, list(range(100, 200)))
    assert np.array_equal(dataset_labels(sub), LABELS[100:200])
    assert DataSplit.of({"kind": "dirichlet", "alpha": 0.5}) == DataSplit("dirichlet", alpha=0.5)
    assert DataSplit.of("shards") == DataSplit("shards") and DataSplit.of(None) is None
    with pytest.raises(UserError, match="kind must be"):
        DataSplit.of("skewed")
    with pytest.raises(UserError, match=r"no field\(s\) \['beta'\]"):
        DataSplit.of({"kind": "dirichlet", "beta": 1})
    with pytest.raises(UserError, match="alpha > 0"):
        DataSplit("dirichlet", alpha=0.0)
    with pytest.raises(UserError, match="needs the training samples' labels"):  # e.g. ALBERT's dict samples
        dataset_labels([{"input_ids": torch.zeros(3)}] * 4)
