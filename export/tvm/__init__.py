"""Apache TVM (Relax) artifacts: compiled libraries for CPUs, GPUs and phones, tuned with MetaSchedule.

``tvm`` is imported inside the functions that use it, so importing this package is cheap.

Example:
    >>> from edgecompress.export.tvm import export_tvm_format
    >>> art = export_tvm_format(onnx_artifact, get_target("x86-64"), "art-tvm/", tune="10m")  # doctest: +SKIP
"""

from edgecompress.export.tvm.exporter import (
    FORMAT,
    export_tvm_format,
    export_tvm_from_onnx,
    export_tvm_from_program,
)
from edgecompress.export.tvm.tuning import (
    TuneBudget,
    TuneBudgetError,
    TuningReport,
    database_key,
    default_database_root,
)

__all__ = [
    "FORMAT",
    "TuneBudget",
    "TuneBudgetError",
    "TuningReport",
    "database_key",
    "default_database_root",
    "export_tvm_format",
    "export_tvm_from_onnx",
    "export_tvm_from_program",
]
