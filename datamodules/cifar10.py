"""CIFAR-10 as a LightningDataModule: torchvision's reader, the standard augmentation, the test split for evaluation.

It knows nothing of BTARD: under a distributed strategy Lightning installs the sampler that shards the data.
``synthetic`` chooses the data: ``False`` CIFAR-10 only; ``True`` the synthetic stand-in
(``datamodules/synthetic.py``); ``"auto"`` CIFAR-10 when ``data_dir`` holds it (or, with ``download``, when it
can be fetched), else the stand-in, announced in a banner. The stand-in is written to ``<data_dir>/synthetic``
(where ``./run demo`` writes it) unless ``data_dir`` itself holds one. Needs torchvision (the ``[examples]`` extra).
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from datamodules.synthetic import BASE_FOLDER, CIFAR10_FILES, SYNTHETIC_MARKER, write_synthetic_cifar10
from lightning_btard.extras import require
from lightning_btard.lightning_package import pl, rank_zero_only, rank_zero_warn

if TYPE_CHECKING:
    from torchvision import transforms as T

__all__ = ["CIFAR10DataModule", "CIFAR10_MEAN", "CIFAR10_STD", "NORMALIZATIONS"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
"""The training set's per-channel mean and standard deviation (over all pixels)."""
NORMALIZATIONS = {
    "standard": (CIFAR10_MEAN, CIFAR10_STD),
    # the released BTARD code's (and many CIFAR repositories'): the same mean, with a standard deviation that is the
    # mean of the per-image standard deviations, about 0.8 times the dataset's
    "released": (CIFAR10_MEAN, (0.2023, 0.1994, 0.2010)),
}
"""``CIFAR10DataModule(normalization=...)``: the constants of ``transforms.Normalize``."""
SYNTHETIC_SIZE = {"n_train": 8000, "n_test": 1000, "seed": 0}
"""The stand-in ``synthetic=True``/``"auto"`` writes (the demo's)."""


def _torchvision() -> Any:
    return require("torchvision", "datamodules.CIFAR10DataModule")


def _reader(synthetic: bool) -> Any:
    """torchvision's CIFAR10 reader; for the stand-in, one whose files must exist and whose md5 is not checked."""
    CIFAR10 = _torchvision().datasets.CIFAR10
    if not synthetic:
        return CIFAR10
    if "_SyntheticCIFAR10" in globals():
        return globals()["_SyntheticCIFAR10"]

    class _SyntheticCIFAR10(CIFAR10):
        def _check_integrity(self) -> bool:
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, name)) for name in CIFAR10_FILES)

        def _load_meta(self) -> None:
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(path, "rb") as infile:
                self.classes = pickle.load(infile, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    globals()["_SyntheticCIFAR10"] = _SyntheticCIFAR10  # module-level, so that DataLoader workers can unpickle it
    return _SyntheticCIFAR10


def __getattr__(name: str) -> Any:
    if name == "_SyntheticCIFAR10":  # made on first use (torchvision is imported lazily)
        return _reader(True)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 (or the synthetic stand-in from ``write_synthetic_cifar10``) with crop+flip augmentation.

    ``download=None`` downloads only when the files are missing, ``False`` never downloads. ``synthetic``: see the
    module's docstring (``False``, ``True`` or ``"auto"``). Validation and test
    both use the CIFAR-10 test split (the BTARD paper reports test accuracy during training); ``val_subset``
    keeps only its first N samples for quick periodic evaluation. ``normalization="released"`` uses the released BTARD
    code's constants (:data:`NORMALIZATIONS`) instead of the dataset's standard deviation, for exact reproduction.
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 8,
        num_workers: int = 0,
        download: Optional[bool] = None,
        augment: bool = True,
        eval_batch_size: int = 256,
        val_subset: Optional[int] = None,
        synthetic: Union[bool, Literal["auto"]] = False,
        normalization: Literal["standard", "released"] = "standard",
    ) -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {sorted(NORMALIZATIONS)}, got {normalization!r}")
        _torchvision()  # the [examples] extra: say so now, not at prepare_data
        if synthetic not in (True, False, "auto"):
            raise ValueError(f"synthetic must be true, false or 'auto', got {synthetic!r}")
        if synthetic is True and download:
            raise ValueError("synthetic=True writes a local stand-in; it cannot be combined with download=True")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(
                f"batch sizes must be positive, got batch_size={batch_size}, eval_batch_size={eval_batch_size}"
            )
        if val_subset is not None and val_subset < 1:
            raise ValueError(f"val_subset must be a positive number of samples or None, got {val_subset}")
        self.save_hyperparameters()
        self.data_dir = str(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.download = download
        self.augment = augment
        self.eval_batch_size = eval_batch_size
        self.val_subset = val_subset
        self.synthetic = synthetic
        self.normalization = normalization
        self.train_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None
        self._warned_synthetic = False

    @property
    def folder(self) -> Path:
        """The ``cifar-10-batches-py`` directory the data is read from: ``data_dir``'s, or the stand-in's under
        ``<data_dir>/synthetic`` when ``synthetic`` asks for it (``True``, or ``"auto"`` with no CIFAR-10 there)."""
        own = Path(self.data_dir) / BASE_FOLDER
        if self.synthetic is False or (own / SYNTHETIC_MARKER).is_file():
            return own
        if self.synthetic == "auto" and _present(own):
            return own
        return Path(self.data_dir) / "synthetic" / BASE_FOLDER

    @property
    def is_synthetic(self) -> bool:
        """True when ``data_dir`` holds the synthetic stand-in (its ``SYNTHETIC`` marker), not CIFAR-10."""
        return (self.folder / SYNTHETIC_MARKER).is_file()

    @property
    def num_classes(self) -> int:
        """Number of classes (10)."""
        return 10

    def train_transform(self) -> T.Compose:
        """Random crop with 4-pixel padding and horizontal flip (when ``augment``), then normalisation."""
        T = _torchvision().transforms
        steps: list = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.augment else []
        return T.Compose([*steps, T.ToTensor(), T.Normalize(*NORMALIZATIONS[self.normalization])])

    def eval_transform(self) -> T.Compose:
        """Normalisation only."""
        T = _torchvision().transforms
        return T.Compose([T.ToTensor(), T.Normalize(*NORMALIZATIONS[self.normalization])])

    def _files_present(self) -> bool:
        return _present(self.folder)

    def _missing_error(self, reason: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"CIFAR-10 not found: looked for {self.folder.resolve()} (data_dir={self.data_dir!r}) and {reason}. "
            f"To fix: put the extracted '{BASE_FOLDER}' directory under data_dir, or run once with internet access "
            "and download=None/True, or for offline demos and tests write the synthetic stand-in with "
            f"`datamodules.write_synthetic_cifar10({self.data_dir!r})` (it is NOT CIFAR-10)."
        )

    def prepare_data(self) -> None:
        """Download CIFAR-10 when it is missing and downloading is allowed, or write the stand-in when ``synthetic``
        asks for it (called on one process per node)."""
        real = Path(self.data_dir) / BASE_FOLDER
        if self.synthetic == "auto" and not _present(real) and self.download:
            try:
                _reader(False)(self.data_dir, train=True, download=True)
            except Exception as err:  # noqa: BLE001 - offline is the expected failure; the banner says what we use
                rank_zero_warn(f"could not download CIFAR-10 ({type(err).__name__}: {str(err)[:120]})")
        if self.synthetic is not False and self.folder != real:
            write_synthetic_cifar10(self.folder.parent, **SYNTHETIC_SIZE)
        if self.is_synthetic or (self._files_present() and not self.download):
            return
        if self.download is False:
            raise self._missing_error("download=False, so it was not downloaded")
        try:
            _reader(False)(self.data_dir, train=True, download=True)
        except Exception as err:  # noqa: BLE001 - any network/archive failure becomes one clear message
            raise self._missing_error(f"could not download it ({type(err).__name__}: {err})") from None

    def setup(self, stage: Optional[str] = None) -> None:
        """Build the datasets the stage needs: the train split for ``fit``, the test split for evaluation."""
        if not self._files_present():
            reason = "download=False, so it was not downloaded" if self.download is False else (
                "it is not there on this machine (prepare_data downloads it only where it runs)"
            )
            raise self._missing_error(reason)
        if self.is_synthetic and not self._warned_synthetic:
            self._warned_synthetic = True
            why = f" (no CIFAR-10 in {Path(self.data_dir).resolve() / BASE_FOLDER})" if self.synthetic == "auto" else ""
            _banner(
                "\n" + "=" * 100 + "\n"
                f"TRAINING ON SYNTHETIC STAND-IN DATA, NOT CIFAR-10{why}:\n{self.folder} was written by "
                "write_synthetic_cifar10 (SYNTHETIC marker found; md5 checks skipped).\n"
                "Accuracies measured on it say nothing about CIFAR-10. For the real data: put 'cifar-10-batches-py' "
                "under data_dir, or --data.download=true when online.\n" + "=" * 100
            )
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._dataset(train=True, transform=self.train_transform())
        if stage in (None, "fit", "validate", "test") and self.test_set is None:
            self.test_set = self._dataset(train=False, transform=self.eval_transform())

    def _dataset(self, train: bool, transform: T.Compose) -> Dataset:
        cls = _reader(self.is_synthetic)
        try:
            return cls(str(self.folder.parent), train=train, transform=transform, download=False)
        except RuntimeError:
            raise RuntimeError(
                f"The CIFAR-10 files in {self.folder.resolve()} failed torchvision's md5 integrity check: they are "
                "corrupted or not the real CIFAR-10. Delete that directory and download again (download=None/True "
                "with internet access); if it is meant to be the synthetic stand-in, rewrite it with "
                f"`datamodules.write_synthetic_cifar10` (its {SYNTHETIC_MARKER} marker is missing)."
            ) from None

    def _require(self, dataset: Optional[Dataset], stage: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"CIFAR10DataModule.setup({stage!r}) must run before its dataloaders are requested")
        return dataset

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the last incomplete batch is dropped so every step has ``batch_size`` samples."""
        return DataLoader(
            self._require(self.train_set, "fit"),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        """The test split (its first ``val_subset`` samples when set), unshuffled."""
        dataset = self._require(self.test_set, "validate")
        if self.val_subset is not None and self.val_subset < len(dataset):
            dataset = Subset(dataset, range(self.val_subset))
        return self._eval_loader(dataset)

    def test_dataloader(self) -> DataLoader:
        """The whole test split, unshuffled."""
        return self._eval_loader(self._require(self.test_set, "test"))

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )


def _present(folder: Path) -> bool:
    """Whether ``folder`` holds every file of CIFAR-10's python version."""
    return all((folder / name).is_file() for name in CIFAR10_FILES)


@rank_zero_only
def _banner(text: str) -> None:
    """Printed, not warned: it must show even where warnings are filtered (``PYTHONWARNINGS=ignore``)."""
    print(text, file=sys.stderr, flush=True)
