"""Datasets and the four disjoint splits (backbone-train, policy-train, calibration, test).

Every dataset comes out as float32 images ``(n, C, H, W)`` in ``[0, 1]`` and int64 labels.

Formats:
- ``digits``: scikit-learn's ``load_digits`` (8x8 grey, 1,797 images); embedded, no files.
- ``fashion-mnist``: the four standard idx ``.gz`` files in ``data_dir`` (default
  ``/usr/share/datasets/fashion-mnist/``, Debian package ``dataset-fashion-mnist``);
  its test split is the official 10,000-image test set.
- a path to an ``.npz``: ``x`` uint8 (0..255) or float (0..1) ``(n, H, W)`` or ``(n, C, H, W)``,
  ``y`` int ``(n,)`` in ``0..num_classes-1``; optional ``x_test``/``y_test`` become the test split.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
SPLIT_NAMES = ("backbone_train", "policy_train", "calibration", "test")


class DataError(ValueError):
    """Malformed or missing data; the message names the problem and the fix."""


@dataclass(frozen=True)
class SplitConfig:
    """How a dataset is cut into four disjoint stratified splits."""

    seed: int = 0
    """Seed of the stratified shuffles; the same seed gives the same splits."""
    policy_frac: float = 0.15
    """Share of the (non-test) pool given to policy training."""
    calibration_frac: float = 0.10
    """Share of the (non-test) pool used to calibrate the policy."""
    test_frac: float = 0.15
    """Share held out for test when the dataset has no official test set."""


@dataclass
class Split:
    x: torch.Tensor
    """Images ``(n, C, H, W)``, float32 in ``[0, 1]``."""
    y: torch.Tensor
    """Labels ``(n,)``, int64."""
    index: np.ndarray
    """Row of each image in its source array (for cache keys and provenance)."""

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    name: str
    num_classes: int
    splits: dict[str, Split]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.splits["test"].x.shape[1:])


def to_images(x: np.ndarray, source: str) -> np.ndarray:
    """uint8 or float ``(n, H, W)`` / ``(n, C, H, W)`` -> float32 ``(n, C, H, W)`` in ``[0, 1]``."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{source}: images must be (n, H, W) or (n, C, H, W), got shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{source}: images must be uint8 (0..255) or float (0..1), got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise DataError(f"{source}: images contain NaN or infinite values; clean or drop those rows")
    if x.min() < 0 or x.max() > 1:
        raise DataError(f"{source}: float images must lie in [0, 1], got [{x.min():.3g}, {x.max():.3g}]; divide by 255?")
    return x.astype(np.float32)


def check_labels(y: np.ndarray, n: int, source: str, num_classes: int | None = None) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{source}: labels must have shape ({n},) to match the images, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source}: labels must be integers, got dtype {y.dtype}")
    upper = num_classes if num_classes is not None else int(y.max()) + 1
    if y.min() < 0 or y.max() >= upper:
        raise DataError(f"{source}: labels must lie in 0..{upper - 1}, got {y.min()}..{y.max()}")
    return y.astype(np.int64)


def read_idx_gz(path: Path) -> np.ndarray:
    """Read an idx (``ubyte``) file, gzip-compressed, as a numpy array."""
    if not path.is_file():
        raise DataError(
            f"missing {path}; install it with `apt-get install dataset-fashion-mnist` "
            "or pass --data-dir pointing at the four Fashion-MNIST .gz files"
        )
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise DataError(f"{path}: not an unsigned-byte idx file (header {raw[:4].hex()})")
        shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(shape)):
            raise DataError(f"{path}: truncated, expected {int(np.prod(shape))} values, found {data.size}")
        return data.reshape(shape)
    except (OSError, EOFError, struct.error) as err:
        raise DataError(f"{path}: unreadable idx.gz file ({err}); download it again") from err


def _stratified_split(y: np.ndarray, index: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rest, taken = train_test_split(index, test_size=frac, stratify=y[index], random_state=seed)
    return np.sort(rest), np.sort(taken)


def make_splits(
    name: str, x: np.ndarray, y: np.ndarray, split: SplitConfig, test: tuple[np.ndarray, np.ndarray] | None = None
) -> Dataset:
    """Cut ``x, y`` into the four splits; ``test`` (an official test set) replaces the held-out one."""
    x = to_images(x, name)
    num_classes = int(max(y.max(), test[1].max() if test is not None else 0)) + 1
    y = check_labels(y, len(x), name, num_classes)
    pool = np.arange(len(y))
    if test is None:
        pool, test_index = _stratified_split(y, pool, split.test_frac, split.seed)
        x_test, y_test = x, y
    else:
        x_test = to_images(test[0], f"{name} test")
        y_test = check_labels(test[1], len(x_test), f"{name} test", num_classes)
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"{name}: test images {x_test.shape[1:]} differ from train images {x.shape[1:]}")
        test_index = np.arange(len(y_test))
    pool, calibration = _stratified_split(y, pool, split.calibration_frac, split.seed + 1)
    backbone_train, policy_train = _stratified_split(
        y, pool, split.policy_frac / (1 - split.calibration_frac), split.seed + 2
    )

    def subset(xs: np.ndarray, ys: np.ndarray, index: np.ndarray) -> Split:
        return Split(torch.from_numpy(xs[index]), torch.from_numpy(ys[index]), index)

    splits = {
        "backbone_train": subset(x, y, backbone_train),
        "policy_train": subset(x, y, policy_train),
        "calibration": subset(x, y, calibration),
        "test": subset(x_test, y_test, test_index),
    }
    return Dataset(name, num_classes, splits)


def dataset_name(dataset: str) -> str:
    """The short name of a dataset argument: 'digits', 'fashion-mnist', or an .npz path's file stem."""
    return dataset if dataset in ("digits", "fashion-mnist") else Path(dataset).stem


def default_paths(dataset: str) -> dict[str, str]:
    """Where a dataset's artifacts live by default: its backbone checkpoint and its policy."""
    name = dataset_name(dataset)
    return {"backbone": f"checkpoints/{name}", "policy": f"policies/{name}"}


def load_dataset(name: str = "digits", data_dir: str | Path | None = None, split: SplitConfig | None = None) -> Dataset:
    """Load ``digits``, ``fashion-mnist`` or an ``.npz`` path and cut it into the four splits."""
    split = split or SplitConfig()
    if name == "digits":
        digits = load_digits()
        return make_splits("digits", (digits.images / 16.0).astype(np.float32), digits.target, split)
    if name == "fashion-mnist":
        root = Path(data_dir) if data_dir else FASHION_MNIST_DIR
        files = {key: read_idx_gz(root / fname) for key, fname in FASHION_MNIST_FILES.items()}
        return make_splits(
            "fashion-mnist", files["train_x"], files["train_y"], split, (files["test_x"], files["test_y"])
        )
    path = Path(name)
    if path.suffix != ".npz":
        raise DataError(f"unknown dataset {name!r}; use 'digits', 'fashion-mnist' or a path to an .npz file")
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            data = {key: arrays[key] for key in arrays.files}
    except ValueError as err:
        raise DataError(f"{path}: cannot read without pickle ({err}); save plain arrays with np.savez") from err
    for key in ("x", "y"):
        if key not in data:
            raise DataError(f"{path}: missing array {key!r}; an .npz needs 'x' (images) and 'y' (labels)")
    test = (data["x_test"], data["y_test"]) if "x_test" in data and "y_test" in data else None
    return make_splits(dataset_name(name), data["x"], data["y"], split, test)
