"""Turning models into artifacts for a target: ONNX now, TVM in export.tvm.

Heavy libraries (torch, onnx, onnxruntime) are imported inside the functions that use them.
"""

from edgecompress.export.artifact import (
    Artifact,
    Manifest,
    StageRecord,
    TensorSpec,
    artifact_writer,
    load_artifact,
    sha256_file,
    write_manifest,
)
from edgecompress.export.errors import ArtifactError, ExportError, UnsupportedExportError
from edgecompress.export.onnx_export import (
    OnnxExporter,
    export_onnx,
    write_onnx_artifact,
)
from edgecompress.export.verify import compare_outputs, sqnr_db

__all__ = [
    "Artifact",
    "ArtifactError",
    "ExportError",
    "Manifest",
    "OnnxExporter",
    "StageRecord",
    "TensorSpec",
    "UnsupportedExportError",
    "artifact_writer",
    "compare_outputs",
    "export_onnx",
    "load_artifact",
    "sha256_file",
    "sqnr_db",
    "write_manifest",
    "write_onnx_artifact",
]
