"""What the verbs of the Python API return, and the data wrapper they accept."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Result:
    """What one verb produced.

    Attributes:
        verb: ``sparsify``, ``qat``, ``codebook``, ``quantize``, ``export``, ``check``, ``profile`` or ``run``.
        model: the compressed ``nn.Module`` (technique verbs that keep a torch model), else None.
        bundle: the model with its inputs, preprocessing and metadata (a ``ModelBundle``), to pass on
            to the next verb; None when the verb made no torch model.
        artifact: the written artifact (``edgecompress.export.Artifact``), else None.
        metrics: the verb's measurements (accuracy, latency, sizes, the technique's own numbers).
        paths: the files and folders written (``workdir``, ``artifact``, ``checkpoint``, ...).
        guard: the accuracy guard's verdict (``status`` passed / failed / unmeasured, ``metric``, ``drop``).
        failures: failed gates, one dict each (``target``, ``gate``, ``limit``, ``value``, ``excess``).
        summary: the machine-readable summary, exactly what the command prints with ``--json``.
    """

    verb: str
    model: Any = None
    bundle: Any = None
    artifact: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    guard: dict[str, Any] | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    worst_layers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """No failed gate and no failed accuracy guard."""
        return not self.failures and (self.guard or {}).get("status") != "failed"

    def raise_for_failure(self) -> Result:
        """Raise what the command would exit 4 with: :class:`~edgecompress.compress.guard.GuardFailure`
        for a failed accuracy guard, :class:`~edgecompress.compress.errors.GateFailure` for a failed
        gate; returns the result itself otherwise (so it chains)."""
        if self.guard is not None:
            from edgecompress.compress.guard import enforce

            written = self.paths.get("workdir") or self.paths.get("artifact") or ""
            enforce(self.guard, self.verb, layers=self.worst_layers, written=str(written))
        if self.failures:
            from edgecompress.compress.errors import GateFailure

            first = self.failures[0]
            raise GateFailure(f"{self.verb}: {first['gate']} failed ({first['value']} > {first['limit']})", self.failures)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The summary (``--json``'s content)."""
        return dict(self.summary)


class Data:
    """Data for a verb from any iterable of batches, as ``nncf.Dataset`` takes it.

    Args:
        items: an iterable (a ``torch.utils.data.DataLoader``, a list, a generator function's result)
            whose elements are batches or single samples.
        transform: turns one element into the model's inputs and, optionally, labels: it returns an
            array (one input), a ``{name: array}`` dict (several inputs, an optional ``"y"`` entry for
            labels) or a tuple ``(inputs, labels)``. Without it, elements are used as they are, and a
            ``(x, y)`` pair is read as inputs and labels.
        name: how reports name the data.
        batched: the elements are batches (the first dim is samples); False: single samples.

    Example:
        >>> loader = torch.utils.data.DataLoader(my_dataset, batch_size=32)  # doctest: +SKIP
        >>> data = ec.Data(loader, transform=lambda batch: (batch["pixels"], batch["label"]))  # doctest: +SKIP
    """

    def __init__(self, items: Iterable[Any], transform: Callable[[Any], Any] | None = None, *, name: str = "python data",
                 batched: bool = True) -> None:  # fmt: skip
        self.items = items
        self.transform = transform
        self.name = name
        self.batched = batched

    def __iter__(self) -> Any:
        for item in self.items:
            yield self.transform(item) if self.transform is not None else item
