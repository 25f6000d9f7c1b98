"""Brevitas' post-training algorithms as Quantune configurations: the torch model is quantized with
``brevitas.graph`` and exported as a standard QCDQ ONNX graph that onnxruntime runs, then measured
by the same evaluator as onnxruntime's own quantizer.

What brevitas adds to onnxruntime's ``quantize_static``: cross-layer (graph) equalization
(``preprocess_for_quantize(equalize_iters=...)``), bias correction (``bias_correction_mode``) and
error-correcting weight rounding, GPTQ (``gptq_mode``) or GPFQ (``gpfq_mode``). Activations are
calibrated by brevitas' statistics (``calibration_mode``: the 99.999th percentile of each
activation, the ``percentile`` calibration of the labels); weights are int8, symmetric, per
channel or per tensor. Only models given as checkpoints have these configurations (an ONNX file
has no torch graph); a model brevitas cannot trace makes them failed trials, named.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.compress.errors import first_line

#: the brevitas algorithm sets the search space offers (``PTQConfig.brevitas``)
ALGORITHM_SETS = ("calibrate", "equalize", "bias_correction", "equalize+bias_correction", "gptq", "equalize+gptq",
                  "gpfq")  # fmt: skip
EQUALIZE_ITERS = 20
BATCH = 16


class BrevitasError(RuntimeError):
    """Brevitas could not quantize or export this model with this configuration (a failed trial)."""


def _tensors(feeds: dict[str, np.ndarray], names: tuple[str, ...], start: int, stop: int) -> tuple[Any, ...]:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[n][start:stop])) for n in names)


def _maps(per_channel: bool) -> dict[str, Any]:
    """brevitas' default quantizer maps with the weights per channel or per tensor."""
    from brevitas.graph.quantize import COMPUTE_LAYER_MAP
    from brevitas.quant import Int8WeightPerChannelFloat, Int8WeightPerTensorFloat

    weight = Int8WeightPerChannelFloat if per_channel else Int8WeightPerTensorFloat
    layers: dict[Any, Any] = {}
    for cls, entry in COMPUTE_LAYER_MAP.items():
        if entry is not None and "weight_quant" in entry[1]:
            entry = (entry[0], {**entry[1], "weight_quant": weight})
        layers[cls] = entry
    return {"compute_layer_map": layers}


def _passes(model: Any, calib: dict[str, np.ndarray], names: tuple[str, ...], n: int) -> None:
    for i in range(0, n, BATCH):
        model(*_tensors(calib, names, i, min(i + BATCH, n)))


def quantize_module(module: Any, config: Any, calib: dict[str, np.ndarray], names: tuple[str, ...]) -> Any:
    """The brevitas fake-quantized copy of ``module`` for ``config`` (the torch model is not changed).

    Raises:
        BrevitasError: the model cannot be traced or quantized this way.
    """
    import torch
    from brevitas.graph.calibrate import bias_correction_mode, calibration_mode
    from brevitas.graph.quantize import preprocess_for_quantize, quantize

    algos = set(config.brevitas.split("+"))
    n = min(config.calib_size, len(next(iter(calib.values()))))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # ReLU6 stays ReLU6 (brevitas' default turns it into ReLU, another function)
            model = preprocess_for_quantize(copy.deepcopy(module).eval(), relu6_to_relu=False,
                                            equalize_iters=EQUALIZE_ITERS if "equalize" in algos else 0)  # fmt: skip
            model = quantize(model, **_maps(config.per_channel)).eval()
            with calibration_mode(model):
                _passes(model, calib, names, n)
            if "bias_correction" in algos:
                with bias_correction_mode(model):
                    _passes(model, calib, names, n)
            for name in ("gptq", "gpfq"):
                if name in algos:
                    _round_weights(model, name, calib, names, n)
    except BrevitasError:
        raise
    except Exception as exc:  # FX tracing and brevitas' handlers raise many types on unseen architectures
        raise BrevitasError(f"brevitas cannot quantize this model ({config.brevitas}): {type(exc).__name__}: "
                            f"{first_line(exc)}") from None  # fmt: skip
    return model


def _round_weights(model: Any, name: str, calib: dict[str, np.ndarray], names: tuple[str, ...], n: int) -> None:
    from brevitas.graph.gpfq import gpfq_mode
    from brevitas.graph.gptq import gptq_mode

    mode = gptq_mode if name == "gptq" else gpfq_mode
    with mode(model) as g:
        for _ in range(g.num_layers):
            _passes(g.model, calib, names, n)
            g.update()


def export_qcdq(model: Any, sample: tuple[Any, ...], names: tuple[str, ...], out: Path) -> None:
    """The fake-quantized model as a QCDQ ONNX graph (opset 17, symbolic batch) onnxruntime runs."""
    import torch
    from brevitas.export import export_onnx_qcdq

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx_qcdq(model, sample if len(sample) > 1 else sample[0], export_path=str(out), opset_version=17,
                             dynamo=False, input_names=list(names))  # fmt: skip
    except Exception as exc:  # the exporter raises many types; a failed trial either way
        raise BrevitasError(f"brevitas cannot export this model to QCDQ ONNX: {type(exc).__name__}: "
                            f"{first_line(exc)}") from None  # fmt: skip
    _free_batch(out, sample)


def _free_batch(path: Path, sample: tuple[Any, ...]) -> None:
    """Make the traced batch-1 graph's batch dimension symbolic (brevitas' exporter fails with
    ``dynamic_axes``) when onnxruntime still runs it so; otherwise the graph stays at batch 1, which
    sessions run in slices (onnxruntime fails some symbolic-batch QCDQ graphs, EfficientNet-Lite's)."""
    import onnx

    model = onnx.load(str(path))
    for v in [*model.graph.input, *model.graph.output]:
        dims = v.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    del model.graph.value_info[:]  # shapes inferred for batch 1
    free = path.with_name(path.stem + "-batch.onnx")
    onnx.save(model, str(free))
    from edgecompress.export.ort_session import ort_session

    try:
        sess = ort_session(free, log_level=4)
        names = [i.name for i in sess.get_inputs()]
        sess.run(None, {n: np.concatenate([t.numpy()] * 2) for n, t in zip(names, sample, strict=True)})
    except Exception:  # onnxruntime's own error classes: keep the batch-1 graph
        free.unlink(missing_ok=True)
        return
    free.replace(path)


def quantize_to_onnx(module: Any, config: Any, calib: dict[str, np.ndarray], names: tuple[str, ...], out: Path) -> Any:
    """Quantize ``module`` with brevitas for ``config`` and write the QCDQ graph to ``out``; returns the
    fake-quantized torch model (the reference the ONNX graph must match)."""
    model = quantize_module(module, config, calib, names)
    export_qcdq(model, _tensors(calib, names, 0, 1), names, out)
    _check_export(model, out, calib, names)
    return model


#: onnxruntime must compute what brevitas simulated (measured: 58 dB on the example CNN)
MIN_EXPORT_SQNR_DB = 30.0


def _check_export(model: Any, out: Path, calib: dict[str, np.ndarray], names: tuple[str, ...]) -> None:
    """The exported graph against brevitas' own fake-quantized model on a few calibration samples.

    Raises:
        BrevitasError: they disagree (seen on EfficientNet-Lite, about 7 dB): the trial fails, named.
    """
    import torch

    from edgecompress.export.verify import sqnr_db
    from edgecompress.runtimes.ort_runtime import OrtSession

    n = min(4, len(next(iter(calib.values()))))
    with torch.no_grad():
        ref = model(*_tensors(calib, names, 0, n))
    ref = ref[0] if isinstance(ref, tuple | list) else ref
    ref = np.asarray(getattr(ref, "value", ref), dtype=np.float64)
    got = OrtSession(str(out), ["CPUExecutionProvider"], 1).run_all({k: calib[k][:n] for k in names})[0]
    db = float(sqnr_db(ref, np.asarray(got, dtype=np.float64)))
    if not db >= MIN_EXPORT_SQNR_DB:
        raise BrevitasError(f"brevitas' QCDQ export computes something else in onnxruntime than brevitas' own model "
                            f"({db:.1f} dB SQNR < {MIN_EXPORT_SQNR_DB:g} dB): not used")  # fmt: skip
