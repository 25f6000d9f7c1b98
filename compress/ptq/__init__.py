"""Quantune: XGBoost-guided post-training quantization search on onnxruntime (Lee et al., FGCS 2022).

``quantize_artifact(fp32_onnx_artifact, splits, QuantuneSearchConfig(...), dest)`` searches the
static-quantization space (calibration method and size, weight granularity, symmetry, reduce_range,
mixed precision) with grid, random, genetic or Quantune search, writes the best ``onnx-qdq``
artifact with its trial log and per-layer sensitivity table. onnxruntime and xgboost are imported
only when a search runs.
"""

from edgecompress.compress.ptq.config import (
    ORT_DEFAULT,
    PTQConfig,
    QuantuneSearchConfig,
    SearchSpace,
    space_preset,
)

__all__ = ["ORT_DEFAULT", "PTQConfig", "QuantuneSearchConfig", "SearchSpace", "quantize_artifact", "space_preset"]


def __getattr__(name: str):
    if name == "quantize_artifact":
        from edgecompress.compress.ptq.search import quantize_artifact

        return quantize_artifact
    raise AttributeError(name)
