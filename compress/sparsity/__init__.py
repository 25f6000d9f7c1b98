"""N:M structured sparsity: masks, SR-STE, MDGF/SDGF progressive gradient flow, verified export.

Example:
    >>> from edgecompress.compress.sparsity import NMSparsityConfig, apply_nm_sparsity
    >>> sparse, metrics = apply_nm_sparsity(bundle, NMSparsityConfig(pattern="2:4", method="mdgf"), splits)
"""

from __future__ import annotations

from typing import Any

from edgecompress.compress.sparsity.config import NMSparsityConfig, parse_pattern

__all__ = ["NMSparsityConfig", "apply_nm_sparsity", "check_module_pattern", "export_sparse_onnx", "parse_pattern",
           "verify_onnx_nm"]  # fmt: skip

_LAZY = {
    "apply_nm_sparsity": "edgecompress.compress.sparsity.api",
    "check_module_pattern": "edgecompress.compress.sparsity.api",
    "export_sparse_onnx": "edgecompress.compress.sparsity.export",
    "verify_onnx_nm": "edgecompress.compress.sparsity.export",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgecompress.compress.sparsity' has no attribute {name!r}")
