"""The onnxruntime backend of Quantune: pre-processing, calibration and static QDQ quantization.

Imported only when quantization runs (it imports onnx and onnxruntime). Pre-processing (shape
inference, constant folding, BN folding by onnxruntime's graph optimiser) runs once per model and is
cached by the model's hash; calibration ranges are cached per (model, calibration method, size,
data) so that configurations which differ only in the weight scheme share one calibration pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.compress.errors import ConfigError, DataError
from edgecompress.compress.ptq.config import PTQConfig
from edgecompress.export.spec import Feeds, slice_feeds
from edgecompress.export.spec import batch_size as batch_size_of

log = logging.getLogger(__name__)

WEIGHTED_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def trial_failure_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "this configuration does not work" rather than a bug in our code.

    onnxruntime's quantizer raises ValueError/RuntimeError/TypeError-free errors for unsupported
    combinations; its sessions raise the pybind exception classes below (they derive directly from
    ``Exception``); NaN scales surface as ArithmeticError. Anything else propagates.
    """
    import onnx
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    return (
        ValueError,
        RuntimeError,
        ArithmeticError,
        onnx.checker.ValidationError,
        ort_state.Fail,
        ort_state.InvalidArgument,
        ort_state.RuntimeException,
        ort_state.InvalidGraph,
        ort_state.NotImplemented,
        ort_state.EPFail,
    )


@dataclass(frozen=True)
class PreparedModel:
    """A pre-processed fp32 ONNX model ready for calibration.

    Attributes:
        path: the pre-processed model file.
        model_hash: sha256 of the original ONNX file (the cache and database key).
        input_names: the graph inputs, in order.
        weighted_nodes: names of Conv/Gemm/MatMul nodes in graph order (the layers of mixed precision
            and of the sensitivity report).
        node_types: op type of each weighted node.
        depthwise_nodes: the depthwise convolutions (one input channel per group, several groups).
        weight_matmuls: the MatMul nodes whose second input is a constant 2-D weight (what 4-bit
            ``MatMulNBits`` can take).
    """

    path: Path
    model_hash: str
    input_names: tuple[str, ...]
    weighted_nodes: tuple[str, ...]
    node_types: tuple[str, ...]
    depthwise_nodes: tuple[str, ...] = ()
    weight_matmuls: tuple[str, ...] = ()


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _named(model: Any) -> Any:
    """Give every node a unique name (the quantizer's include/exclude lists refer to names)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return model


def prepare_model(onnx_path: str | Path, cache_folder: Path) -> PreparedModel:
    """Pre-process ``onnx_path`` for quantization (cached in ``cache_folder`` by the model's hash).

    Raises:
        ConfigError: the file is not a valid ONNX model or onnxruntime's pre-processing rejects it.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = Path(onnx_path)
    if not src.is_file():
        raise ConfigError(f"ONNX model {str(src)!r} does not exist")
    digest = file_hash(src)
    folder = cache_folder / digest[:24]
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / "preprocessed.onnx"
    if not dst.exists():
        try:
            model = onnx.load(str(src))
            onnx.checker.check_model(model)
        except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError, OSError) as exc:
            raise ConfigError(f"{src} is not a valid ONNX model: {str(exc).splitlines()[0][:200]}") from None
        except Exception as exc:  # protobuf's DecodeError has no stable import path: a corrupt file
            if type(exc).__name__ != "DecodeError":
                raise
            raise ConfigError(f"{src} is not a valid ONNX model (cannot parse the protobuf)") from None
        tmp = folder / f".pre-{uuid.uuid4().hex}.onnx"
        try:
            quant_pre_process(_named(model), str(tmp), skip_symbolic_shape=True)
        except trial_failure_types() as exc:
            raise ConfigError(f"onnxruntime cannot pre-process {src} for quantization: {exc}") from None
        os.replace(tmp, dst)
    model = onnx.load(str(dst), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    if not inputs:
        raise ConfigError(f"{src} has no graph inputs to calibrate")
    weighted = [(n.name, n.op_type) for n in model.graph.node if n.op_type in WEIGHTED_OPS]
    return PreparedModel(dst, digest, tuple(inputs), tuple(n for n, _ in weighted), tuple(t for _, t in weighted),
                         depthwise_convs(model), weight_matmuls(model))  # fmt: skip


def depthwise_convs(model: Any) -> tuple[str, ...]:
    """Names of the ``Conv`` nodes with more than one group and one input channel per group."""
    from onnx import helper

    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        group = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)
        weight = dims.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if group > 1 and weight is not None and len(weight) > 1 and weight[1] == 1:
            out.append(node.name)
    return tuple(out)


def weight_matmuls(model: Any) -> tuple[str, ...]:
    """Names of the ``MatMul`` nodes whose second input is a 2-D initializer."""
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    return tuple(n.name for n in model.graph.node
                 if n.op_type == "MatMul" and len(n.input) > 1 and len(dims.get(n.input[1], [])) == 2)  # fmt: skip


#: 4-bit MatMul weights: block size and onnxruntime's accuracy level 4 (int8 activations inside the kernel)
MATMUL_4BIT_BLOCK = 32
MATMUL_4BIT_ACCURACY_LEVEL = 4


def matmul_4bit_model(prepared: PreparedModel, folder: Path) -> Path:
    """``prepared`` with its constant-weight MatMuls as 4-bit ``MatMulNBits`` (symmetric, block 32, W4A8),
    cached in ``folder`` by the model's hash.

    Raises:
        ValueError: the model has no such MatMul (the configuration changes nothing).
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if not prepared.weight_matmuls:
        raise ValueError("4-bit MatMul weights: the model has no MatMul with a constant weight")
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{prepared.model_hash[:24]}-b{MATMUL_4BIT_BLOCK}.onnx"
    if not out.is_file():
        quantizer = MatMulNBitsQuantizer(onnx.load(str(prepared.path)), bits=4, block_size=MATMUL_4BIT_BLOCK,
                                         is_symmetric=True, accuracy_level=MATMUL_4BIT_ACCURACY_LEVEL,
                                         nodes_to_include=list(prepared.weight_matmuls), op_types_to_quantize=("MatMul",))  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            quantizer.process()
        tmp = folder / f".{uuid.uuid4().hex}.onnx"
        onnx.save(quantizer.model.model, str(tmp))
        os.replace(tmp, out)
    return out


def calibration_batch_size(n: int, most: int = 64) -> int:
    """The largest batch size <= ``most`` that divides ``n``.

    onnxruntime's histogram calibrators (Entropy, Percentile, Distribution) stack the outputs of
    all batches into one array and fail with "inhomogeneous shape" when the last batch is shorter,
    so every batch must have the same size.
    """
    return max(b for b in range(1, min(n, most) + 1) if n % b == 0)


def calibration_reader(feeds: Feeds) -> Any:
    """onnxruntime's ``CalibrationDataReader`` over ``feeds``, in equal batches (:func:`calibration_batch_size`)."""
    from onnxruntime.quantization import CalibrationDataReader

    n = batch_size_of(feeds)
    batch_size = calibration_batch_size(n)

    class _FeedsReader(CalibrationDataReader):
        """Feeds calibration batches of every model input (preprocessed, cast to the inputs' dtypes)."""

        def __init__(self) -> None:
            self._i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._i >= n:
                return None
            batch = {k: np.ascontiguousarray(v) for k, v in slice_feeds(feeds, self._i, self._i + batch_size).items()}
            self._i += batch_size
            return batch

        def __len__(self) -> int:
            return n

    return _FeedsReader()


def calibration_samples(calib: Feeds, size: int) -> Feeds:
    """The first ``size`` calibration samples of every input (the split is already shuffled); capped
    by what it holds.

    Raises:
        DataError: the calibration set is empty.
    """
    n = batch_size_of(calib)
    if n == 0:
        raise DataError("the calibration set is empty; PTQ needs at least one calibration sample")
    return slice_feeds(calib, 0, min(size, n))


def feeds_hash(feeds: Feeds) -> str:
    h = hashlib.sha256()
    for k in sorted(feeds):
        h.update(k.encode())
        h.update(np.ascontiguousarray(feeds[k]).tobytes())
    return h.hexdigest()


def excluded_nodes(prepared: PreparedModel, config: PTQConfig, sensitive_order: list[str] | None,
                   slow_nodes: list[str] | None = None) -> list[str]:  # fmt: skip
    """Node names left in float by ``config`` (mixed precision)."""
    names = list(config.exclude_nodes)
    if config.keep_float == "first_last" and prepared.weighted_nodes:
        names += [prepared.weighted_nodes[0], prepared.weighted_nodes[-1]]
    elif config.keep_float == "sensitive":
        if sensitive_order is None:
            raise ConfigError("keep_float='sensitive' needs the layer sensitivity ranking of this model")
        names += sensitive_order[: config.keep_float_k]
    elif config.keep_float == "depthwise":
        names += prepared.depthwise_nodes
    elif config.keep_float == "slow":
        if slow_nodes is None:
            raise ConfigError("keep_float='slow' needs the per-layer int8/float timing of this model")
        names += slow_nodes
    return sorted(set(names))


def quantize_to_file(
    prepared: PreparedModel,
    config: PTQConfig,
    calib: Feeds,
    out_path: Path,
    calib_cache: Path,
    *,
    nodes_to_exclude: list[str] | None = None,
    nodes_to_quantize: list[str] | None = None,
    tensor_overrides: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Quantize ``prepared`` with ``config`` (static, QDQ) into ``out_path``.

    ``tensor_overrides`` pins tensors' scales (onnxruntime's ``TensorQuantOverrides``: brevitas'
    rounded weights keep brevitas' scales).

    Calibration ranges are stored in ``calib_cache`` (a folder) and reused by later calls with the
    same calibration key; the file is written atomically so parallel workers never read half of it.

    Returns:
        ``{"calibration_seconds", "calibrated", "quantize_seconds"}``.

    Raises:
        DataError: empty calibration set. Trial failures (see :func:`trial_failure_types`) propagate.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    samples = calibration_samples(calib, config.calib_size)
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
        "distribution": CalibrationMethod.Distribution,
    }[config.calibration]
    data_hash = feeds_hash(samples)
    ckey = hashlib.sha256(f"{prepared.model_hash}|{config.calibration_key()}|{data_hash}".encode()).hexdigest()[:24]
    calib_cache.mkdir(parents=True, exist_ok=True)
    final = calib_cache / f"{ckey}.json"
    meta = calib_cache / f"{ckey}.meta.json"
    cached = final.is_file()
    cache_arg = final if cached else calib_cache / f".{ckey}-{uuid.uuid4().hex}.json"
    extra: dict[str, Any] = {
        "ActivationSymmetric": config.activation_symmetric,
        "WeightSymmetric": config.weight_symmetric,
    }
    if config.calibration == "percentile":
        extra["CalibPercentile"] = config.percentile
    if tensor_overrides:
        extra["TensorQuantOverrides"] = tensor_overrides
    t0 = time.perf_counter()
    # onnxruntime's quantizer writes "<model>-inferred.onnx" beside its input and deletes it after:
    # concurrent trials on one model file would delete each other's, so each reads a private link.
    model_path = matmul_4bit_model(prepared, calib_cache.parent / "matmul4bit") if config.matmul_4bit else prepared.path
    private = Path(tempfile.mkdtemp(prefix="edgecompress-quantize-src-"))
    source = private / model_path.name
    try:
        source.symlink_to(model_path.resolve())
    except OSError:
        shutil.copyfile(model_path, source)
    # onnxruntime's calibrators print progress to stdout; keep library output clean.
    with contextlib.redirect_stdout(io.StringIO()), _removed_after(private):
        quantize_static(
            str(source),
            str(out_path),
            None if cached else calibration_reader(samples),
            quant_format=QuantFormat.QDQ,
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            activation_type=_activation_type(config),
            weight_type=QuantType.QInt4 if config.weight_bits == 4 else QuantType.QInt8,
            nodes_to_exclude=nodes_to_exclude or None,
            nodes_to_quantize=nodes_to_quantize or None,
            op_types_to_quantize=list(WEIGHTED_OPS) if config.op_types == "weighted" else None,
            calibrate_method=method,
            calibration_cache_path=str(cache_arg),
            extra_options=extra,
        )
    seconds = time.perf_counter() - t0
    if cached:
        calib_seconds = float(json.loads(meta.read_text())["seconds"]) if meta.is_file() else 0.0
        return {"calibration_seconds": calib_seconds, "calibrated": False, "quantize_seconds": seconds}
    # The first pass paid for calibration: remember what it cost so replayed searches can be timed honestly.
    meta.write_text(json.dumps({"seconds": seconds, "samples": batch_size_of(samples), "key": config.calibration_key()}))
    os.replace(cache_arg, final)
    return {"calibration_seconds": seconds, "calibrated": True, "quantize_seconds": seconds}


def _activation_type(config: PTQConfig) -> Any:
    from onnxruntime.quantization import QuantType

    if config.activation_bits == 16:
        return QuantType.QInt16 if config.activation_symmetric else QuantType.QUInt16
    return QuantType.QInt8 if config.activation_symmetric else QuantType.QUInt8


@contextlib.contextmanager
def _removed_after(folder: Path) -> Iterator[None]:
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def model_outputs(model_path: Path | str, feeds: Feeds | np.ndarray, threads: int = 1) -> list[np.ndarray]:
    """Every output of the ONNX model for all samples of ``feeds`` (or one array, for a one-input
    model) on onnxruntime's CPU provider with a fixed thread count, so trials are comparable.

    Raises:
        RuntimeExecutionError: onnxruntime cannot load the model (a failed trial).
    """
    from edgecompress.runtimes.measure import run_all_batched
    from edgecompress.runtimes.ort_runtime import OrtSession

    return run_all_batched(OrtSession(str(model_path), ["CPUExecutionProvider"], threads), feeds, 250)
