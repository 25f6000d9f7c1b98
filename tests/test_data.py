from __future__ import annotations

import numpy as np
import pytest

from edgecompress.compress.data import load_dataset, load_splits, split_dataset
from edgecompress.compress.errors import DataError


def test_mnist_splits_deterministic_and_disjoint(mnist_splits):
    s = mnist_splits
    sizes = {k: len(s[k]) for k in ("train", "calib", "val", "test")}
    assert sizes == {"train": 3000, "calib": 500, "val": 500, "test": 1000}
    # Disjoint: no identical image appears in two splits (MNIST has no exact duplicates here).
    keys = {k: {row.tobytes() for row in s[k].x} for k in sizes}
    assert not (keys["train"] & keys["test"]) and not (keys["calib"] & keys["val"]) and not (keys["val"] & keys["test"])
    again = load_splits("mnist")
    assert np.array_equal(again.test.y, s.test.y) and np.array_equal(again.test.x, s.test.x)
    assert s.train.x.dtype == np.float32 and s.train.x.shape[1:] == (1, 28, 28)
    # Stratified: every class in every split.
    for k in sizes:
        assert set(np.unique(s[k].y)) == set(range(10))


def test_digits_upsampled():
    ds = load_dataset("digits")
    assert ds.x.shape == (1797, 1, 28, 28) and ds.num_classes == 10


def test_rotated_mnist_domains():
    ds = load_dataset("rotated-mnist")
    assert ds.domain_names == ("0deg", "15deg", "30deg", "45deg", "60deg", "75deg")
    sizes = [len(ds.domain(i)) for i in range(6)]
    assert sum(sizes) == 5000 and min(sizes) >= 833
    # Domains are really rotated: the 75-degree images differ from upright digits in orientation.
    upright, rotated = ds.domain(0).x.mean(0), ds.domain(5).x.mean(0)
    assert np.abs(upright - rotated).mean() > 0.05


def test_npz_roundtrip(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (40, 28, 28), dtype=np.uint8)
    y = np.repeat(np.arange(4), 10)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset(tmp_path / "d.npz", preprocessing={"scale": 1 / 255, "mean": [0.5], "std": [0.5]})
    assert ds.x.shape == (40, 1, 28, 28) and ds.num_classes == 4
    assert np.allclose(ds.x[0, 0], (x[0] / 255 - 0.5) / 0.5, atol=1e-6)
    s = split_dataset(ds)
    assert sum(len(s[k]) for k in ("train", "calib", "val", "test")) == 40


def test_npz_with_nan_rejected(tmp_path):
    x = np.zeros((10, 1, 4, 4), dtype=np.float32)
    x[3, 0, 1, 1] = np.nan
    np.savez(tmp_path / "bad.npz", x=x, y=np.zeros(10, dtype=np.int64))
    with pytest.raises(DataError, match="NaN"):
        load_dataset(tmp_path / "bad.npz")


def test_npz_missing_arrays(tmp_path):
    np.savez(tmp_path / "bad.npz", y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="one array per model input"):
        load_dataset(tmp_path / "bad.npz")
    np.savez(tmp_path / "text.npz", x=np.array(["a", "b"]))
    with pytest.raises(DataError, match="dtype <U1"):
        load_dataset(tmp_path / "text.npz")


def test_empty_folder_rejected(tmp_path):
    with pytest.raises(DataError, match="no class sub-folders"):
        load_dataset(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_dataset(tmp_path)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (10, 12), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    ds = load_dataset(tmp_path, input_shape=(1, 28, 28))
    assert ds.x.shape == (12, 1, 28, 28) and list(np.unique(ds.y)) == [0, 1]
    assert ds.preprocessing["classes"] == ["a", "b"]


def test_unknown_builtin():
    with pytest.raises(DataError, match="built-in"):
        load_dataset("imagenet")
