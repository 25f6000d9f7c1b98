"""The one place the techniques are registered: recipe stages, ONNX exporters, export formats and
the checkpoint restorers of compressed layers.

Every entry names its code as ``"module:attribute"``, imported when first used. So which exporter
or stage runs never depends on what happened to be imported before, importing this module loads
no technique, and no import cycle runs through the registrations. A new technique adds its lines
here.
"""

from __future__ import annotations

import importlib
from typing import Any

STAGES: dict[str, str] = {
    "sparsify": "edgecompress.compress.sparsity.stage:STAGE",
    "qat": "edgecompress.compress.qat.stage:STAGE",
    "codebook": "edgecompress.compress.codebook.stage:STAGE",
    "ptq": "edgecompress.compress.ptq.stage:STAGE",
}
"""Recipe stage name -> its ``StageSpec``."""

ONNX_EXPORTERS: tuple[str, ...] = (
    "edgecompress.compress.codebook.stage:EXPORTER",  # codebook layers (also in a QAT'd or sparse model)
    "edgecompress.compress.qat.onnx_qdq:EXPORTER",  # LSQ fake-quantized layers -> QDQ
    "edgecompress.compress.sparsity.export:EXPORTER",  # an N:M sparse model of plain layers, verified
)
"""The custom torch -> ONNX exporters (``OnnxExporter``), tried in this order; the first whose
predicate accepts the module exports it, else plain ``torch.onnx.export``."""

EXPORT_FORMATS: dict[str, str] = {
    "onnx": "edgecompress.compress.exporting:export_onnx_format",
    "ort": "edgecompress.export.ort_mobile:export_ort_format",
    "tvm": "edgecompress.export.tvm.exporter:export_tvm_format",
}
"""``compress export --format`` name -> ``fn(source, target, out, **options) -> Artifact``."""

RESTORERS: tuple[str, ...] = (
    "edgecompress.compress.sparsity.lock:restore_locked_pattern",
    "edgecompress.compress.qat.prepare:restore_quantizers",
    "edgecompress.compress.codebook.api:restore_codebook_layers",
)
"""``fn(module, metadata, state) -> module``, run in order before a saved model's weights load: each
rebuilds the layers its technique replaced (the checkpoint's metadata says whether it applies)."""

MARKERS: tuple[str, ...] = ("edgecompress.compress.sparsity.export:mark_loaded_model",)
"""``fn(module, metadata)``, run after a saved model's weights loaded."""


def resolve(ref: str) -> Any:
    """The object a ``"module:attribute"`` entry names."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def stage_names() -> list[str]:
    return sorted(STAGES)


def stage(name: str) -> Any:
    """The ``StageSpec`` registered as ``name`` (None when there is none)."""
    return resolve(STAGES[name]) if name in STAGES else None


def onnx_exporters() -> list[Any]:
    """The custom ONNX exporters, in the order they are tried."""
    return [resolve(ref) for ref in ONNX_EXPORTERS]


def export_format(name: str) -> Any:
    """The export function of format ``name`` (None when unknown)."""
    return resolve(EXPORT_FORMATS[name]) if name in EXPORT_FORMATS else None


def restorers() -> list[Any]:
    return [resolve(ref) for ref in RESTORERS]


def markers() -> list[Any]:
    return [resolve(ref) for ref in MARKERS]
