"""CIFAR10DataModule and the synthetic stand-in: on-disk format, loading, integrity checks, clear errors."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler
from torchvision.datasets import CIFAR10

from datamodules import CIFAR10DataModule, write_synthetic_cifar10
from datamodules.cifar10 import CIFAR10_MEAN, CIFAR10_STD

N_TRAIN, N_TEST = 250, 60
FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_cifar10(tmp_path_factory.mktemp("synthetic"), n_train=N_TRAIN, n_test=N_TEST, seed=3)


def _setup(root: Path, stage: str = "fit", **kwargs) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(str(root), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.prepare_data()
        dm.setup(stage)
    return dm


def test_files_have_cifar10_on_disk_format(synthetic_root: Path) -> None:
    folder = synthetic_root / "cifar-10-batches-py"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*FILES, "SYNTHETIC", "synthetic.json"])
    sizes = []
    for name in FILES[:6]:
        with open(folder / name, "rb") as f:
            raw = pickle.load(f, encoding="bytes")  # the CIFAR-10 web page's recipe: bytes keys
        assert set(raw) == {b"data", b"labels", b"batch_label", b"filenames"}
        assert raw[b"data"].dtype == np.uint8 and raw[b"data"].shape == (len(raw[b"labels"]), 3072)
        assert all(isinstance(v, int) and 0 <= v <= 9 for v in raw[b"labels"])
        assert len(raw[b"filenames"]) == len(raw[b"labels"]) and isinstance(raw[b"filenames"][0], bytes)
        sizes.append(len(raw[b"labels"]))
    assert sizes == [50, 50, 50, 50, 50, N_TEST]
    with open(folder / "batches.meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")  # torchvision's way: str keys
    assert meta["label_names"][:3] == ["airplane", "automobile", "bird"] and len(meta["label_names"]) == 10
    assert meta["num_vis"] == 3072


def test_loads_through_torchvision_reader(synthetic_root: Path, capsys) -> None:
    dm = CIFAR10DataModule(str(synthetic_root), batch_size=16, eval_batch_size=25)
    assert dm.is_synthetic
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert capsys.readouterr().err.count("TRAINING ON SYNTHETIC STAND-IN DATA, NOT CIFAR-10") == 1  # once, printed
    assert isinstance(dm.train_set, CIFAR10) and isinstance(dm.test_set, CIFAR10)
    assert len(dm.train_set) == N_TRAIN and len(dm.test_set) == N_TEST
    assert dm.train_set.classes[9] == "truck"

    x, y = dm.train_set[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    counts = np.bincount(dm.train_set.targets, minlength=10)
    assert counts.sum() == N_TRAIN and counts.min() == counts.max() == N_TRAIN // 10

    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, RandomSampler) and loader.drop_last
    assert len(loader) == N_TRAIN // 16
    xb, yb = next(iter(loader))
    assert xb.shape == (16, 3, 32, 32) and yb.dtype == torch.int64
    assert 0 <= int(yb.min()) and int(yb.max()) <= 9

    test_loader = dm.test_dataloader()
    assert isinstance(test_loader.sampler, SequentialSampler) and len(test_loader.dataset) == N_TEST
    assert sum(len(b[1]) for b in test_loader) == N_TEST


def test_val_subset_is_first_samples_of_test_split(synthetic_root: Path) -> None:
    dm = _setup(synthetic_root, val_subset=20, eval_batch_size=8)
    val_labels = torch.cat([y for _, y in dm.val_dataloader()])
    assert val_labels.tolist() == dm.test_set.targets[:20]
    assert len(dm.test_dataloader().dataset) == N_TEST


def test_normalisation_statistics(synthetic_root: Path) -> None:
    dm = _setup(synthetic_root, stage="test")
    x = torch.stack([dm.test_set[i][0] for i in range(N_TEST)])
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    assert torch.all(mean.abs() < 0.25), mean
    assert torch.all((std > 0.8) & (std < 1.4)), std
    raw = torch.from_numpy(dm.test_set.data[0]).permute(2, 0, 1).float() / 255
    expected = (raw - torch.tensor(CIFAR10_MEAN)[:, None, None]) / torch.tensor(CIFAR10_STD)[:, None, None]
    torch.testing.assert_close(dm.test_set[0][0], expected)


def test_augmentation_is_random_only_when_enabled(synthetic_root: Path) -> None:
    torch.manual_seed(0)
    augmented = _setup(synthetic_root, augment=True)
    views = [augmented.train_set[0][0] for _ in range(6)]
    assert any(not torch.equal(views[0], v) for v in views[1:])
    plain = _setup(synthetic_root, augment=False)
    assert torch.equal(plain.train_set[0][0], plain.train_set[0][0])


def test_deterministic_for_a_seed_and_idempotent(tmp_path: Path) -> None:
    a = write_synthetic_cifar10(tmp_path / "a", n_train=50, n_test=20, seed=7)
    b = write_synthetic_cifar10(tmp_path / "b", n_train=50, n_test=20, seed=7)
    c = write_synthetic_cifar10(tmp_path / "c", n_train=50, n_test=20, seed=8)
    assert a == tmp_path / "a"
    for name in FILES:
        assert (a / "cifar-10-batches-py" / name).read_bytes() == (b / "cifar-10-batches-py" / name).read_bytes()
    assert (a / "cifar-10-batches-py/test_batch").read_bytes() != (c / "cifar-10-batches-py/test_batch").read_bytes()

    batch = a / "cifar-10-batches-py/data_batch_1"
    os.utime(batch, (1_000_000, 1_000_000))
    write_synthetic_cifar10(a, n_train=50, n_test=20, seed=7)
    assert batch.stat().st_mtime == 1_000_000  # same parameters: not rewritten
    write_synthetic_cifar10(a, n_train=60, n_test=20, seed=7)
    assert batch.stat().st_mtime != 1_000_000
    assert len(_setup(a).train_set) == 60


def test_md5_check_stays_on_without_marker(tmp_path: Path) -> None:
    root = write_synthetic_cifar10(tmp_path, n_train=20, n_test=10)
    (root / "cifar-10-batches-py/SYNTHETIC").unlink()
    dm = CIFAR10DataModule(str(root), download=False)
    assert not dm.is_synthetic
    dm.prepare_data()  # files are present: nothing to download
    with pytest.raises(RuntimeError, match="md5 integrity check") as info:
        dm.setup("fit")
    assert str((root / "cifar-10-batches-py").resolve()) in str(info.value)
    with pytest.raises(RuntimeError, match="corrupted"):
        CIFAR10(str(root), train=True, download=False)


def test_missing_data_without_download_gives_clear_error(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(str(tmp_path / "nowhere"), download=False)
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str((tmp_path / "nowhere" / "cifar-10-batches-py").resolve()) in message
    assert "download=False" in message and "write_synthetic_cifar10" in message and "cifar-10-batches-py" in message
    with pytest.raises(FileNotFoundError, match="write_synthetic_cifar10"):
        dm.setup("fit")


def test_missing_data_download_failure_gives_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def offline(self: CIFAR10) -> None:
        calls.append(self.root)
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(CIFAR10, "download", offline)
    dm = CIFAR10DataModule(str(tmp_path), download=None)
    with pytest.raises(FileNotFoundError, match="could not download it.*no internet") as info:
        dm.prepare_data()
    assert len(calls) == 1 and "write_synthetic_cifar10" in str(info.value)


def test_synthetic_writer_refuses_to_overwrite_real_data(tmp_path: Path) -> None:
    root = write_synthetic_cifar10(tmp_path, n_train=20, n_test=10)
    (root / "cifar-10-batches-py/SYNTHETIC").unlink()
    with pytest.raises(FileExistsError, match="not synthetic"):
        write_synthetic_cifar10(tmp_path, n_train=30, n_test=10)
    shutil.rmtree(root / "cifar-10-batches-py")
    with pytest.raises(ValueError):
        write_synthetic_cifar10(tmp_path, n_train=0)


def test_synthetic_auto_uses_cifar10_when_present_and_the_announced_stand_in_otherwise(tmp_path: Path, synthetic_root: Path,
                                                                                       monkeypatch, capsys) -> None:
    import datamodules.cifar10 as cifar10

    monkeypatch.setattr(cifar10, "SYNTHETIC_SIZE", {"n_train": 120, "n_test": 30, "seed": 1})
    # no CIFAR-10 in data_dir: the stand-in is written to <data_dir>/synthetic and a banner says so
    dm = CIFAR10DataModule(str(tmp_path), synthetic="auto", download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert re.search(r"(?s)={20}.*NOT CIFAR-10 \(no CIFAR-10 in .*synthetic.*={20}", capsys.readouterr().err)
    assert dm.is_synthetic and dm.folder == tmp_path / "synthetic" / "cifar-10-batches-py"
    assert len(dm.train_set) == 120 and len(dm.test_set) == 30
    # what ./run demo wrote there is reused by the same config (the same parameters: nothing rewritten)
    stamp = (dm.folder / "data_batch_1").stat().st_mtime_ns
    CIFAR10DataModule(str(tmp_path), synthetic="auto", download=False).prepare_data()
    assert (dm.folder / "data_batch_1").stat().st_mtime_ns == stamp
    # CIFAR-10's files in data_dir (here: the stand-in's bytes without its marker, so md5 is checked) win over it
    real = tmp_path / "real"
    shutil.copytree(synthetic_root / "cifar-10-batches-py", real / "cifar-10-batches-py")
    (real / "cifar-10-batches-py" / "SYNTHETIC").unlink()
    dm = CIFAR10DataModule(str(real), synthetic="auto", download=False)
    dm.prepare_data()
    assert dm.folder == real / "cifar-10-batches-py" and not dm.is_synthetic
    with pytest.raises(RuntimeError, match="md5 integrity check"):  # it is read as CIFAR-10, not as the stand-in
        dm.setup("fit")


def test_synthetic_true_writes_the_stand_in_and_bad_switches_are_refused(tmp_path: Path, monkeypatch) -> None:
    import datamodules.cifar10 as cifar10

    monkeypatch.setattr(cifar10, "SYNTHETIC_SIZE", {"n_train": 50, "n_test": 20, "seed": 2})
    dm = _setup(tmp_path, synthetic=True)
    assert dm.is_synthetic and len(dm.train_set) == 50
    with pytest.raises(ValueError, match="synthetic must be true, false or 'auto'"):
        CIFAR10DataModule(str(tmp_path), synthetic="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot be combined with download=True"):
        CIFAR10DataModule(str(tmp_path), synthetic=True, download=True)
    # synthetic=False never falls back: the missing data is an error that names the way out
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found.*write_synthetic_cifar10"):
        _setup(tmp_path / "empty", synthetic=False, download=False)


@pytest.mark.parametrize(("normalization", "std"), [("standard", (0.2470, 0.2435, 0.2616)), ("released", (0.2023, 0.1994, 0.2010))])
def test_normalization_constants(normalization, std) -> None:
    dm = CIFAR10DataModule(normalization=normalization)
    for transform in (dm.train_transform(), dm.eval_transform()):
        normalize = transform.transforms[-1]
        assert tuple(normalize.mean) == (0.4914, 0.4822, 0.4465) and tuple(normalize.std) == std
    with pytest.raises(ValueError, match="normalization"):
        CIFAR10DataModule(normalization="imagenet")  # type: ignore[arg-type]
