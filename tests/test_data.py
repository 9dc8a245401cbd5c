import gzip
import struct

import numpy as np
import pytest

from backbone.data import FASHION_MNIST_DIR, SPLIT_NAMES, DataError, SplitConfig, load_dataset


def test_digits_splits_are_disjoint_stratified_and_seeded():
    data = load_dataset("digits")
    indices = [set(data.splits[name].index.tolist()) for name in SPLIT_NAMES]
    assert sum(len(s) for s in indices) == 1797
    assert len(set().union(*indices)) == 1797
    for name in SPLIT_NAMES:
        counts = np.bincount(data.splits[name].y.numpy(), minlength=10)
        share = counts / counts.sum()
        assert np.abs(share - 0.1).max() < 0.03, name
    again = load_dataset("digits")
    other = load_dataset("digits", split=SplitConfig(seed=1))
    assert np.array_equal(data.splits["test"].index, again.splits["test"].index)
    assert not np.array_equal(data.splits["test"].index, other.splits["test"].index)
    x = data.splits["backbone_train"].x
    assert x.dtype.is_floating_point and x.shape[1:] == (1, 8, 8) and 0 <= x.min() and x.max() <= 1


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_npz_dataset_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(200, 3, 8, 8), dtype=np.uint8)
    y = np.repeat(np.arange(4), 50)
    data = load_dataset(_write_npz(tmp_path / "mine.npz", x=x, y=y))
    assert data.num_classes == 4 and data.image_shape == (3, 8, 8)
    assert sum(len(s) for s in data.splits.values()) == 200


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((10, 8, 8), np.uint8)}, "missing array 'y'"),
        ({"x": np.zeros((10, 8), np.uint8), "y": np.zeros(10, int)}, r"must be \(n, H, W\)"),
        ({"x": np.zeros((10, 8, 8), np.uint8), "y": np.zeros(9, int)}, r"shape \(10,\)"),
        ({"x": np.full((10, 8, 8), np.nan, np.float32), "y": np.zeros(10, int)}, "NaN"),
        ({"x": np.full((10, 8, 8), 3.0, np.float32), "y": np.zeros(10, int)}, r"\[0, 1\]"),
        ({"x": np.zeros((10, 8, 8), np.uint8), "y": -np.ones(10, int)}, "labels must lie"),
    ],
)
def test_malformed_npz_raises_clear_error(tmp_path, arrays, message):
    with pytest.raises(DataError, match=message):
        load_dataset(_write_npz(tmp_path / "bad.npz", **arrays))


def test_unknown_dataset_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="no such file"):
        load_dataset(str(tmp_path / "nope.npz"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_truncated_idx_file(tmp_path):
    for name, shape in [("train-images-idx3-ubyte.gz", (5, 28, 28)), ("train-labels-idx1-ubyte.gz", (5,)),
                        ("t10k-images-idx3-ubyte.gz", (5, 28, 28)), ("t10k-labels-idx1-ubyte.gz", (5,))]:
        header = struct.pack(">HBB", 0, 8, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(header + bytes(10))  # far fewer values than the header promises
    with pytest.raises(DataError, match="truncated"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST files absent: apt-get install dataset-fashion-mnist")
def test_fashion_mnist_uses_official_test_set():
    data = load_dataset("fashion-mnist")
    assert len(data.splits["test"]) == 10_000
    assert sum(len(data.splits[n]) for n in ("backbone_train", "policy_train", "calibration")) == 60_000
    assert data.image_shape == (1, 28, 28)
