"""A small, learnable stand-in for CIFAR-10, written in CIFAR-10's own on-disk python format.

It lets the whole pipeline (torchvision's reader, the datamodule, training, attacks) run offline and
fast. It is NOT CIFAR-10: a ``SYNTHETIC`` marker file tells the datamodule so, and it warns loudly.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import uuid
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_synthetic_cifar10", "SYNTHETIC_MARKER", "PARAMS_FILE", "BASE_FOLDER", "CIFAR10_FILES"]

BASE_FOLDER = "cifar-10-batches-py"
SYNTHETIC_MARKER = "SYNTHETIC"
PARAMS_FILE = "synthetic.json"
_FORMAT_VERSION = 2  # bump whenever the generated images change, so stale directories are rewritten
_NUM_CLASSES = 10
_SIZE = 32
_MAX_SHIFT = 4
_N_FREQ = 3
_COMMON_STD = 36.0
_CLASS_STD = 28.0
_JITTER_STD = 20.0
_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_CHANNEL_MEAN = np.array([0.4914, 0.4822, 0.4465]) * 255.0
_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
_TEST_FILE = "test_batch"
_META_FILE = "batches.meta"
CIFAR10_FILES = [*_TRAIN_FILES, _TEST_FILE, _META_FILE]
"""CIFAR-10's files in ``cifar-10-batches-py`` (torchvision's ``train_list``, ``test_list`` and ``meta``)."""


class _Py2Str(bytes):
    """A Python 2 ``str``: loads as ``str`` with ``encoding="latin1"`` and as ``bytes`` with ``encoding="bytes"``."""


class _Py2Pickler(pickle._Pickler):  # type: ignore[misc, name-defined]
    """Protocol-2 pickler that writes ``_Py2Str`` as a Python 2 string, like the real CIFAR-10 files.

    The real files are Python 2 pickles: torchvision reads them with ``encoding="latin1"`` (``str`` keys),
    the CIFAR-10 web page's recipe with ``encoding="bytes"`` (``bytes`` keys); both work on our files too.
    """

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _save_py2str(self, obj: _Py2Str) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + bytes(obj))
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + bytes(obj))
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2str


def _s(text: str) -> _Py2Str:
    return _Py2Str(text.encode("latin1"))


def _dump(obj: Any, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")  # writers side by side (a sweep's cells)
    with open(tmp, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)
    os.replace(tmp, path)


def _smooth_images(rng: np.random.Generator, count: int, std: float) -> np.ndarray:
    """``count`` mutually orthogonal smooth random colour images ``[count, 3, S, S]`` (S > 32) of RMS ``std``.

    Zero mean colour over the centre crop; equidistant classes make the difficulty similar for every seed.
    """
    size = _SIZE + 2 * _MAX_SHIFT
    coords = np.arange(size) / size
    freqs = np.arange(_N_FREQ)
    # cos/sin bases along each axis: [2 * N_FREQ, size]
    basis = np.concatenate(
        [np.cos(2 * np.pi * freqs[:, None] * coords[None, :]), np.sin(2 * np.pi * freqs[:, None] * coords[None, :])]
    )
    coef = rng.standard_normal((count, 3, basis.shape[0], basis.shape[0]))
    coef /= 1.0 + np.add.outer(np.arange(basis.shape[0]) % _N_FREQ, np.arange(basis.shape[0]) % _N_FREQ)
    images = np.einsum("kcij,iy,jx->kcyx", coef, basis, basis)
    centre = images[:, :, _MAX_SHIFT : _MAX_SHIFT + _SIZE, _MAX_SHIFT : _MAX_SHIFT + _SIZE]
    images -= centre.mean(axis=(2, 3), keepdims=True)  # zero mean colour where the crops are taken
    ortho, _ = np.linalg.qr(images.reshape(count, -1).T)
    return ortho.T.reshape(images.shape) * (std * np.sqrt(images[0].size))


def _class_templates(rng: np.random.Generator) -> np.ndarray:
    """One smooth colour image per class: a background shared by all classes plus a weaker class-specific part."""
    common = _smooth_images(rng, 1, _COMMON_STD)
    specific = _smooth_images(rng, _NUM_CLASSES, _CLASS_STD)
    return common + specific + _CHANNEL_MEAN[None, :, None, None]


def _make_split(rng: np.random.Generator, templates: np.ndarray, n: int, noise: float) -> tuple[np.ndarray, list[int]]:
    """``n`` images (uint8 ``[n, 3072]``, CHW rows) with balanced, shuffled labels."""
    labels = rng.permutation(np.arange(n) % _NUM_CLASSES)
    data = np.empty((n, 3, _SIZE, _SIZE), dtype=np.uint8)
    shifts = rng.integers(0, 2 * _MAX_SHIFT + 1, size=(n, 2))
    jitter = _JITTER_STD * rng.standard_normal((n, 3, 1, 1))
    for i in range(n):
        dy, dx = shifts[i]
        img = templates[labels[i], :, dy : dy + _SIZE, dx : dx + _SIZE]
        img = img + jitter[i] + noise * rng.standard_normal(img.shape)
        data[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return data.reshape(n, -1), [int(v) for v in labels]


def _params_match(folder: Path, params: dict[str, Any]) -> bool:
    files = [*CIFAR10_FILES, SYNTHETIC_MARKER]
    if not all((folder / name).is_file() for name in files):
        return False
    try:
        return json.loads((folder / PARAMS_FILE).read_text()) == params
    except (OSError, ValueError):
        return False


def write_synthetic_cifar10(
    root: str | Path, n_train: int = 5000, n_test: int = 1000, seed: int = 0, noise: float = 64.0
) -> Path:
    """Write a synthetic 10-class stand-in for CIFAR-10 under ``root/cifar-10-batches-py`` and return ``root``.

    Each class is a fixed random low-frequency colour template (a background shared by all classes plus a
    weaker class-specific pattern); every image is its template shifted by up to 4 pixels, with a random
    colour cast and Gaussian pixel noise of std ``noise`` (0..255 scale). A SmallCNN needs a few hundred SGD
    steps to learn it. Deterministic for a seed; does nothing if the same parameters were already written.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be positive, got n_train={n_train}, n_test={n_test}")
    if noise < 0:
        raise ValueError(f"noise must be non-negative, got {noise}")
    root = Path(root)
    folder = root / BASE_FOLDER
    params = {"version": _FORMAT_VERSION, "n_train": n_train, "n_test": n_test, "seed": seed, "noise": float(noise)}
    if _params_match(folder, params):
        return root
    if folder.is_dir() and not (folder / SYNTHETIC_MARKER).is_file() and any(folder.iterdir()):
        raise FileExistsError(
            f"{folder} exists and is not synthetic data (no {SYNTHETIC_MARKER} marker): it may be the real "
            "CIFAR-10, so it is not overwritten. Choose another root for the synthetic stand-in."
        )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PARAMS_FILE).unlink(missing_ok=True)
    (folder / SYNTHETIC_MARKER).write_text(
        "This directory holds SYNTHETIC stand-in data written by datamodules.write_synthetic_cifar10, "
        "not CIFAR-10.\n"
    )

    rng = np.random.default_rng(seed)
    templates = _class_templates(rng)
    train_data, train_labels = _make_split(rng, templates, n_train, noise)
    test_data, test_labels = _make_split(rng, templates, n_test, noise)

    bounds = np.linspace(0, n_train, len(_TRAIN_FILES) + 1).round().astype(int)
    for i, name in enumerate(_TRAIN_FILES):
        lo, hi = bounds[i], bounds[i + 1]
        _write_batch(folder / name, f"training batch {i + 1} of 5", train_data[lo:hi], train_labels[lo:hi], lo)
    _write_batch(folder / _TEST_FILE, "testing batch 1 of 1", test_data, test_labels, 0)
    meta = {
        _s("num_cases_per_batch"): int(bounds[1] - bounds[0]),
        _s("label_names"): [_s(name) for name in _LABEL_NAMES],
        _s("num_vis"): 3 * _SIZE * _SIZE,
    }
    _dump(meta, folder / _META_FILE)
    (folder / PARAMS_FILE).write_text(json.dumps(params, sort_keys=True) + "\n")
    return root


def _write_batch(path: Path, batch_label: str, data: np.ndarray, labels: list[int], first_index: int) -> None:
    filenames = [
        _s(f"synthetic_{_LABEL_NAMES[label]}_s_{first_index + i:06d}.png") for i, label in enumerate(labels)
    ]
    batch = {
        _s("batch_label"): _s(batch_label),
        _s("labels"): labels,
        _s("data"): np.ascontiguousarray(data),
        _s("filenames"): filenames,
    }
    _dump(batch, path)
