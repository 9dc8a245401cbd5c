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
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from backbone.errors import ProjectError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
SPLIT_NAMES = ("backbone_train", "policy_train", "calibration", "test")


class DataError(ProjectError):
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
    """Images ``(n, C, H, W)``, float32 in ``[0, 1]``; for an image folder a ``backbone.folders.ImageFiles`` instead,
    which reads them from disk batch by batch (``backbone.folders.image_batches`` streams either kind)."""
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
    classes: list[str] | None = None
    """Class names (an image folder's class folders), or None where classes are only numbers."""
    record: dict | None = None
    """An image folder's splits as file lists (``backbone.folders``), saved beside the checkpoint."""

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
    if x.size == 0:
        raise DataError(f"{source}: no images (shape {x.shape}); give at least one image of at least one pixel")
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
    if y.size == 0:
        raise DataError(f"{source}: no labels; give one integer label per image")
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


NPZ_ARRAYS = {"x": "images", "y": "labels", "x_test": "test images", "y_test": "test labels"}
NPZ_HOW = "write it with np.savez(path, x=images, y=labels) from plain numeric arrays"
_NPZ_FAILURES = (OSError, EOFError, ValueError, KeyError, RuntimeError, NotImplementedError,
                 zipfile.BadZipFile, zlib.error, struct.error)


def read_npz(
    path: str | Path, required: tuple[str, ...], optional: tuple[str, ...] = (),
    paired: tuple[tuple[str, str], ...] = (),
) -> dict[str, np.ndarray]:
    """The ``required`` and (those present of) the ``optional`` arrays of an ``.npz``, read without pickle.

    The one reader of the project's ``.npz`` inputs: every malformed file is a ``DataError`` naming the file
    and the fix: a missing file, something that is not an ``.npz`` (random bytes, a pickle, an ``.npy``
    renamed ``.npz``), a truncated or corrupt archive, object arrays, empty arrays, a missing ``required``
    array, and one array of a ``paired`` couple without the other. Other arrays in the file are not read.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err}); check the path and its permissions") from err
    if magic.startswith(b"\x93NUMPY"):
        raise DataError(f"{path}: a single .npy array (renamed .npz?), not an .npz archive; {NPZ_HOW}")
    if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        kind = "an empty file" if not magic else "not an .npz (zip) archive"
        raise DataError(f"{path}: {kind}; {NPZ_HOW}")
    arrays: dict[str, np.ndarray] = {}
    key = None
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = list(npz.files)
            for key in (*required, *optional):
                if key in found:
                    arrays[key] = npz[key]
    except _NPZ_FAILURES as err:
        if key is not None and isinstance(err, ValueError) and "allow_pickle" in str(err):
            raise DataError(f"{path}: array {key!r} holds Python objects (dtype object), which are never "
                            f"unpickled; {NPZ_HOW}") from err
        at = f" (array {key!r})" if key is not None else ""
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"{path}: truncated or corrupt .npz{at}: {reason}; {NPZ_HOW}") from err
    for key in required:
        if key not in arrays:
            role = f" ({NPZ_ARRAYS[key]})" if key in NPZ_ARRAYS else ""
            raise DataError(f"{path}: missing array {key!r}{role}; found {found or 'no arrays'}; {NPZ_HOW}")
    for a, b in paired:
        if (a in arrays) != (b in arrays):
            have, lack = (a, b) if a in arrays else (b, a)
            raise DataError(f"{path}: has {have!r} but no {lack!r}; save both or neither")
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray):
            raise DataError(f"{path}: {key!r} is not a numpy array; {NPZ_HOW}")
        if value.dtype.hasobject:
            raise DataError(f"{path}: array {key!r} holds Python objects (dtype object); {NPZ_HOW}")
        if value.ndim == 0 or value.size == 0:
            raise DataError(f"{path}: array {key!r} is {'a scalar' if value.ndim == 0 else 'empty'} "
                            f"(shape {value.shape}); it needs one row per image")
    return arrays


def _stratified_split(y: np.ndarray, index: np.ndarray, frac: float, seed: int, source: str,
                      min_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        rest, taken = train_test_split(index, test_size=frac, stratify=y[index], random_state=seed)
    except ValueError as err:
        classes, counts = np.unique(y, return_counts=True)
        smallest = int(classes[counts.argmin()])
        raise DataError(
            f"{source}: too few images per class for the four stratified splits ({len(y)} images; class {smallest} "
            f"has {counts.min()}); give every class at least {min_per_class} images"
        ) from err
    return np.sort(rest), np.sort(taken)


def split_rows(y: np.ndarray, split: SplitConfig, test_set: bool, source: str) -> dict[str, np.ndarray]:
    """Rows ``{split name: sorted indices into y}`` of the four disjoint stratified splits of labels ``y`` ``(n,)``.

    With ``test_set`` (the data has its own test set) ``y`` is the pool of the other three and no ``"test"`` rows
    are returned. The one place splits are cut: arrays (``make_splits``) and image folders
    (``backbone.folders``) alike.
    """
    # each stratified cut needs at least one image per class on both sides: the smallest share decides
    pool_share = 1 - (0 if test_set else split.test_frac)
    shares = [pool_share * split.calibration_frac, pool_share * split.policy_frac]
    shares += [] if test_set else [split.test_frac]
    min_per_class = max(2, math.ceil(1 / min(shares)))
    pool = np.arange(len(y))
    rows = {}
    if not test_set:
        pool, rows["test"] = _stratified_split(y, pool, split.test_frac, split.seed, source, min_per_class)
    pool, rows["calibration"] = _stratified_split(y, pool, split.calibration_frac, split.seed + 1, source,
                                                  min_per_class)
    rows["backbone_train"], rows["policy_train"] = _stratified_split(
        y, pool, split.policy_frac / (1 - split.calibration_frac), split.seed + 2, source, min_per_class
    )
    for split_name, index in rows.items():
        if len(index) == 0:
            raise DataError(f"{source}: the {split_name} split is empty ({len(y)} images); "
                            f"give every class at least {min_per_class} images")
    return rows


def make_splits(
    name: str, x: np.ndarray, y: np.ndarray, split: SplitConfig, test: tuple[np.ndarray, np.ndarray] | None = None,
    source: str | None = None,
) -> Dataset:
    """Cut ``x, y`` into the four splits; ``test`` (an official test set) replaces the held-out one.

    ``source`` (default ``name``) is what error messages call the data, e.g. the ``.npz`` path.
    """
    source = source or name
    x = to_images(x, source)
    y = check_labels(y, len(x), source)
    if test is not None:
        x_test = to_images(test[0], f"{source} (x_test)")
        y_test = check_labels(test[1], len(x_test), f"{source} (y_test)")
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"{source}: test images {x_test.shape[1:]} differ from train images {x.shape[1:]}")
    num_classes = int(max(y.max(), y_test.max() if test is not None else 0)) + 1
    rows = split_rows(y, split, test_set=test is not None, source=source)
    if test is None:
        x_test, y_test = x, y
    else:
        rows["test"] = np.arange(len(y_test))

    def subset(xs: np.ndarray, ys: np.ndarray, index: np.ndarray) -> Split:
        return Split(torch.from_numpy(xs[index]), torch.from_numpy(ys[index]), index)

    splits = {name: subset(x, y, rows[name]) for name in SPLIT_NAMES[:3]}
    splits["test"] = subset(x_test, y_test, rows["test"])
    return Dataset(name, num_classes, splits)


def dataset_name(dataset: str) -> str:
    """The short name of a dataset argument: 'digits', 'fashion-mnist', or an .npz path's file stem."""
    return dataset if dataset in ("digits", "fashion-mnist") else Path(dataset).stem


def default_paths(dataset: str) -> dict[str, str]:
    """Where a dataset's artifacts live by default: the shipped backbone and policy that jobs read, and where
    new ones are written (under ``runs/``, so that a job never replaces a shipped artifact unless told to),
    the measured latency table included."""
    name = dataset_name(dataset)
    return {"backbone": f"checkpoints/{name}", "policy": f"policies/{name}",
            "new_backbone": f"runs/{name}/backbone", "new_policy": f"runs/{name}/policy",
            "latency": f"runs/{name}/latency.json"}


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
    data = read_npz(path, ("x", "y"), ("x_test", "y_test"), paired=(("x_test", "y_test"),))
    test = (data["x_test"], data["y_test"]) if "x_test" in data else None
    return make_splits(dataset_name(name), data["x"], data["y"], split, test, source=str(path))
