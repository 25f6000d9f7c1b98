"""Data in memory: a :class:`Dataset` (one array per model input, labels when there are any) and
its non-overlapping :class:`Splits` (``train`` for training, ``calib`` for calibration, ``val`` for
early stopping and searches, ``test`` for the numbers reported), split deterministically (seeded,
stratified by class and domain).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgecompress.compress.errors import DataError

SPLIT_FRACTIONS = {"train": 0.6, "calib": 0.1, "val": 0.1, "test": 0.2}


@dataclass
class Dataset:
    """Preprocessed samples, one array per model input, and labels when there are any.

    Attributes:
        inputs: ``{name: array}`` with the samples on the first dim; a single-input dataset holds
            ``{"x": (N, C, H, W) float32}`` (already preprocessed). Several inputs (token ids and a
            mask, say) are named like the model's inputs.
        y: ``int64`` labels of shape ``(N,)``, or None for unlabelled data (the metric is then
            agreement or similarity with the fp32 model).
        name: where it came from (built-in name or path).
        num_classes: number of classes (None without labels).
        preprocessing: how raw pixels became the inputs (written into manifests).
        domains: optional per-sample domain index (Rotated-MNIST).
        domain_names: names of the domains, indexed by ``domains``.
    """

    inputs: dict[str, np.ndarray]
    y: np.ndarray | None
    name: str
    num_classes: int | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    domains: np.ndarray | None = None
    domain_names: tuple[str, ...] = ()
    raw: dict[str, np.ndarray] | None = None
    """Integer images as stored, before ``preprocessing``: fed instead to a model whose inputs are
    integers (a model that takes raw ``uint8`` pixels and normalises them itself)."""

    def __post_init__(self) -> None:
        if isinstance(self.inputs, np.ndarray):  # one array: the single-input form
            self.inputs = {"x": self.inputs}
        if not self.inputs:
            raise DataError(f"dataset {self.name!r} has no input arrays")
        counts = {k: len(v) for k, v in self.inputs.items()}
        if len(set(counts.values())) > 1:
            raise DataError(f"dataset {self.name!r}: input arrays have different sample counts {counts}")
        n = next(iter(counts.values()))
        if self.y is not None and len(self.y) != n:
            raise DataError(f"dataset {self.name!r}: {n} samples but {len(self.y)} labels")
        if n == 0:
            raise DataError(f"dataset {self.name!r} is empty; it needs at least one sample")

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    @property
    def x(self) -> np.ndarray:
        """The samples of a single-input dataset.

        Raises:
            DataError: the dataset has several inputs (use ``inputs``).
        """
        if len(self.inputs) != 1:
            raise DataError(
                f"dataset {self.name!r} has {len(self.inputs)} inputs ({', '.join(self.inputs)}); "
                "this step takes a single-input (image) dataset"
            )
        return next(iter(self.inputs.values()))

    @property
    def has_labels(self) -> bool:
        return self.y is not None

    @property
    def labels(self) -> np.ndarray:
        """The labels.

        Raises:
            DataError: the dataset has none (training then distils from the fp32 model).
        """
        if self.y is None:
            raise DataError(f"dataset {self.name!r} has no labels ('y'); this step needs labelled data")
        return self.y

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample of the first input, without the batch dimension."""
        return tuple(next(iter(self.inputs.values())).shape[1:])

    def subset(self, index: np.ndarray, name: str | None = None) -> Dataset:
        """The samples at ``index`` (a copy)."""
        return Dataset(
            inputs={k: v[index] for k, v in self.inputs.items()},
            y=None if self.y is None else self.y[index],
            name=name or self.name,
            num_classes=self.num_classes,
            preprocessing=self.preprocessing,
            domains=None if self.domains is None else self.domains[index],
            domain_names=self.domain_names,
            raw=None if self.raw is None else {k: v[index] for k, v in self.raw.items()},
        )

    def head(self, n: int, name: str | None = None) -> Dataset:
        """The first ``n`` samples (all when there are fewer)."""
        return self if n >= len(self) else self.subset(np.arange(n), name)

    def domain(self, index: int) -> Dataset:
        """The samples of one domain (Rotated-MNIST)."""
        if self.domains is None:
            raise DataError(f"dataset {self.name!r} has no domains")
        return self.subset(np.flatnonzero(self.domains == index), f"{self.name}[{self.domain_names[index]}]")

    def feeds(self, spec: Any) -> dict[str, np.ndarray]:
        """The arrays as feeds for a model with ``spec`` (a ``ModelSpec`` or an artifact's inputs),
        checked against its input names, dims and dtypes.

        Raises:
            DataError: the arrays do not fit the model (named: which array, which dim, which dtype).
        """
        from edgecompress.export.errors import SpecError
        from edgecompress.export.spec import INTEGER_DTYPES, ModelSpec

        if not isinstance(spec, ModelSpec):
            spec = ModelSpec(list(spec))
        raw_wanted = self.raw is not None and all(i.dtype in INTEGER_DTYPES for i in spec.inputs)
        arrays = self.raw if raw_wanted and self.raw is not None else self.inputs
        try:
            return spec.match(arrays, source=f"dataset {self.name!r}")
        except SpecError as exc:
            raise DataError(str(exc)) from None

    def for_model(self, spec: Any) -> Dataset:
        """This dataset with its arrays named and ordered as the model's inputs (forward order),
        cast to their dtypes: what training loops and calibration feed the model.

        Raises:
            DataError: the arrays do not fit the model (see :meth:`feeds`).
        """
        from dataclasses import replace

        feeds = self.feeds(spec)
        check_labels(self, getattr(spec, "outputs", None) or [])
        return replace(self, inputs=feeds)

    def fingerprint(self) -> str:
        """sha256 of the samples and labels: identifies the data in caches and manifests."""
        h = hashlib.sha256()
        for k in sorted(self.inputs):
            h.update(k.encode())
            h.update(np.ascontiguousarray(self.inputs[k]).tobytes())
        if self.y is not None:
            h.update(np.ascontiguousarray(self.y).tobytes())
        return h.hexdigest()


def check_labels(ds: Dataset, outputs: Any) -> None:
    """Labels must be class indices of the model's first output (``(N, classes)`` logits).

    Raises:
        DataError: a label is negative or not below the number of classes.
    """
    outputs = list(outputs)
    if ds.y is None or not len(ds.y) or not outputs:
        return
    shape = list(outputs[0].shape)
    if len(shape) != 2 or not isinstance(shape[1], int) or shape[1] < 2:
        return
    classes = shape[1]
    lo, hi = int(ds.y.min()), int(ds.y.max())
    if lo < 0 or hi >= classes:
        raise DataError(f"dataset {ds.name!r} has labels {lo}..{hi}, but the model's output {outputs[0].name!r} has "
                        f"{classes} classes (labels 0..{classes - 1}); check the data's 'y' or the model")  # fmt: skip


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

    def for_model(self, spec: Any) -> Splits:
        """Every split named and ordered as the model's inputs (:meth:`Dataset.for_model`)."""
        done: dict[int, Dataset] = {}  # --calib-data/--eval-data fill several roles with one object
        roles = {}
        for role in SPLIT_FRACTIONS:
            ds = getattr(self, role)
            if id(ds) not in done:
                done[id(ds)] = ds.for_model(spec)
            roles[role] = done[id(ds)]
        return Splits(**roles)

    def usage(self) -> dict[str, dict[str, Any]]:
        """Where each role's samples come from and how many there are (reported by every step)."""
        return {role: {"source": getattr(self, role).name, "samples": len(getattr(self, role))} for role in SPLIT_FRACTIONS}


def split_dataset(ds: Dataset, *, seed: int = 0, fractions: dict[str, float] | None = None) -> Splits:
    """Split ``ds`` into train / calib / val / test, stratified by class (and domain), seeded.

    Unlabelled data is split by a seeded shuffle alone.

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
    labels = ds.y if ds.y is not None else np.zeros(len(ds), dtype=np.int64)  # unlabelled: one stratum
    strata = labels if ds.domains is None else ds.domains.astype(np.int64) * 100_000 + labels
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
