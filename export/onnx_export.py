"""torch -> ONNX artifacts: opset >= 17, dynamic batch, checked, shape-inferred, verified on onnxruntime.

Techniques whose modules need a special graph (QDQ quantizers, packed codebooks) register an
exporter with :func:`register_onnx_exporter`; everything else goes through
``torch.onnx.export``. After writing, the ONNX model is checked with ``onnx.checker``, shapes are
inferred, and onnxruntime's outputs are compared with torch's on fixed inputs; the max absolute
error and SQNR go into the manifest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.artifact import (
    Artifact,
    Manifest,
    StageRecord,
    TensorSpec,
    artifact_writer,
    load_artifact,
    write_manifest,
)
from export.errors import ExportError, UnsupportedExportError
from export.verify import compare_outputs

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "output"
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class OnnxExporter:
    """A custom torch -> ONNX path for modules that ``predicate`` recognises.

    ``export(module, example_input, path, opset)`` writes the ONNX file. ``format`` names the
    artifact format (``onnx-qdq``, ``onnx-codebook``), ``min_sqnr_db`` the verification threshold.
    """

    name: str
    predicate: Callable[[Any], bool]
    export: Callable[[Any, Any, Path, int], None]
    format: str = "onnx"
    min_sqnr_db: float = 40.0


_EXPORTERS: list[OnnxExporter] = []


def register_onnx_exporter(exporter: OnnxExporter) -> None:
    """Register a custom exporter (later registrations are tried first)."""
    _EXPORTERS.insert(0, exporter)


def torch_onnx_export(module: Any, example: Any, path: Path, opset: int, **kwargs: Any) -> None:
    """``torch.onnx.export`` as every exporter here calls it: the TorchScript path, our input/output
    names, a dynamic batch and constant folding (``kwargs`` adds e.g. ``custom_opsets``)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,  # the TorchScript exporter: 10x faster here and stable for these models
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
            **kwargs,
        )


def _exported_program_export(program: Any, example: Any, path: Path, opset: int) -> None:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(program, (example,), str(path), dynamo=True, opset_version=max(opset, 18),
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False)  # fmt: skip


def _program_batch(program: Any) -> int | None:
    """The batch size a torch.export program was exported with (None when it is dynamic)."""
    for node in program.graph.nodes:
        if node.op == "placeholder" and "val" in node.meta and node.name in program.graph_signature.user_inputs:
            dim = node.meta["val"].shape[0]
            return int(dim) if isinstance(dim, int) else None
    return None


def _pick_exporter(module: Any) -> OnnxExporter:
    import torch

    if isinstance(module, torch.export.ExportedProgram):
        return OnnxExporter("torch.export+dynamo", lambda m: True, _exported_program_export, "onnx", 40.0)
    for exp in _EXPORTERS:
        if exp.predicate(module):
            return exp
    return OnnxExporter("torch.onnx", lambda m: True, torch_onnx_export, "onnx", 40.0)


def verify_onnx_against_torch(module: Any, onnx_path: Path, inputs: np.ndarray) -> dict[str, float]:
    """Run ``inputs`` through torch and onnxruntime and compare the outputs."""
    import onnxruntime as ort
    import torch

    with torch.no_grad():
        ref = module(torch.from_numpy(inputs)).detach().numpy()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: inputs})[0]
    return compare_outputs(ref, out)


def export_onnx(
    module: Any,
    input_shape: tuple[int, ...],
    dest: str | Path,
    *,
    target: Any = None,
    model_name: str = "",
    preprocessing: dict[str, Any] | None = None,
    stages: list[StageRecord] | None = None,
    parent_hash: str | None = None,
    opset: int = DEFAULT_OPSET,
    verify_inputs: np.ndarray | None = None,
    extra: dict[str, Any] | None = None,
) -> Artifact:
    """Export a torch module to an ONNX artifact folder and verify it on onnxruntime.

    Args:
        module: the model (put in eval mode; not modified).
        input_shape: one sample's shape without the batch dimension.
        dest: the artifact folder to create (replaced atomically if it exists).
        target: a :class:`targets.Target` recorded in the manifest.
        model_name, preprocessing, stages, parent_hash, extra: recorded in the manifest.
        opset: ONNX opset (at least 17).
        verify_inputs: inputs for the torch-vs-onnxruntime check (default: 8 fixed random samples).

    Returns:
        The loaded, hash-verified artifact.

    Raises:
        UnsupportedExportError: an operator cannot be exported (the message names it).
        ExportError: the exported graph is invalid or disagrees with torch beyond the threshold.
    """
    import onnx
    import torch

    if opset < 17:
        raise ExportError(f"opset {opset} is too old; use 17 or newer")
    exporter = _pick_exporter(module)
    gen = torch.Generator().manual_seed(0)
    batch, check_batch = 1, 8
    if isinstance(module, torch.export.ExportedProgram):
        # A program keeps the shapes it was exported with: a static batch stays static in ONNX.
        batch = check_batch = _program_batch(module) or 1
        program, module = module, module.module()
    else:
        program = module
        module.eval()
    example = torch.randn((batch, *input_shape), generator=gen)
    check_inputs = verify_inputs if verify_inputs is not None else torch.randn((check_batch, *input_shape), generator=gen).numpy()
    t0 = time.perf_counter()
    with artifact_writer(dest) as tmp:
        onnx_path = tmp / MODEL_FILE
        try:
            exporter.export(program, example, onnx_path, opset)
        except (torch.onnx.errors.UnsupportedOperatorError, torch.onnx.errors.SymbolicValueError) as exc:
            raise UnsupportedExportError(f"ONNX export of {model_name or type(module).__name__} failed: {exc}") from None
        except UnsupportedExportError:
            raise
        except Exception as exc:  # the exporter's many failure types: report with the model and cause
            raise ExportError(f"ONNX export of {model_name or type(module).__name__} failed: {exc}") from exc
        model = onnx.load(str(onnx_path))
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"exported ONNX graph is invalid: {exc}") from None
        model = onnx.shape_inference.infer_shapes(model)
        onnx.save(model, str(onnx_path))
        check = verify_onnx_against_torch(module, onnx_path, check_inputs.astype(np.float32))
        if check["sqnr_db"] < exporter.min_sqnr_db:
            raise ExportError(
                f"onnxruntime output differs from torch: SQNR {check['sqnr_db']:.1f} dB < {exporter.min_sqnr_db} dB "
                f"(max abs error {check['max_abs_error']:.3g}); the export is wrong for this model"
            )
        outputs = [o for o in model.graph.output]
        manifest = Manifest(
            format=exporter.format,
            format_version=f"onnx-ir{model.ir_version}-opset{opset}",
            model_name=model_name,
            target=target.to_dict() if target is not None else {},
            model_file=MODEL_FILE,
            inputs=[TensorSpec(name=INPUT_NAME, shape=["batch" if program is module else batch, *input_shape],
                               dtype="float32")],
            outputs=[
                TensorSpec(
                    name=o.name,
                    shape=[d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim],
                    dtype="float32",
                )
                for o in outputs
            ],
            preprocessing=preprocessing or {},
            stages=[*(stages or []), StageRecord(stage="export-onnx", config={"opset": opset, "exporter": exporter.name},
                                                 seconds=round(time.perf_counter() - t0, 3))],
            parent_hash=parent_hash,
            metrics={"export_check": check},
            extra=extra or {},
        )  # fmt: skip
        write_manifest(tmp, manifest)
    log.info("exported %s to %s (SQNR %.1f dB vs torch)", model_name, dest, check["sqnr_db"])
    return load_artifact(dest)


def write_onnx_artifact(
    onnx_model: Any,
    dest: str | Path,
    *,
    fmt: str,
    model_name: str = "",
    target: Any = None,
    inputs: list[TensorSpec] | None = None,
    preprocessing: dict[str, Any] | None = None,
    stages: list[StageRecord] | None = None,
    parent_hash: str | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Artifact:
    """Write an in-memory ``onnx.ModelProto`` (e.g. a quantized graph) as an artifact folder."""
    import onnx

    with artifact_writer(dest) as tmp:
        onnx.save(onnx_model, str(tmp / MODEL_FILE))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        opset = max((o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")), default=0)
        manifest = Manifest(
            format=fmt,
            format_version=f"onnx-ir{onnx_model.ir_version}-opset{opset}",
            model_name=model_name,
            target=target.to_dict() if target is not None else {},
            model_file=MODEL_FILE,
            inputs=inputs or [],
            outputs=[TensorSpec(name=o.name, shape=[d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim])
                     for o in onnx_model.graph.output],
            preprocessing=preprocessing or {},
            stages=stages or [],
            parent_hash=parent_hash,
            metrics=metrics or {},
            extra=extra or {},
        )  # fmt: skip
        write_manifest(tmp, manifest)
    return load_artifact(dest)


def bundle_source_info(bundle: Any) -> dict[str, Any]:
    """Where a loaded checkpoint came from (duck-typed ``ModelBundle``), recorded in manifests so
    ``compress check`` can rebuild the fp32 torch reference."""
    from export.artifact import sha256_file

    info: dict[str, Any] = {"model_name": bundle.model_name, "input_shape": list(bundle.input_shape)}
    src = getattr(bundle, "source", None)
    if src and Path(src).is_file():
        info["source_checkpoint"] = str(Path(src).resolve())
        info["source_sha256"] = sha256_file(Path(src))
    return info


def export_bundle_onnx(bundle: Any, dest: str | Path, *, target: Any = None, opset: int | None = None) -> Artifact:
    """Export a loaded checkpoint (duck-typed ``ModelBundle``: ``module``, ``input_shape``, ``model_name``,
    ``preprocessing``, ``metadata``, optional ``exported_program``) to a verified ONNX artifact, with
    its stage lineage and source recorded. Every format that starts from ONNX (tvm, ort) uses this."""
    program = getattr(bundle, "exported_program", None)
    return export_onnx(
        program if program is not None else bundle.module,
        tuple(bundle.input_shape),
        dest,
        target=target,
        model_name=bundle.model_name,
        preprocessing=bundle.preprocessing,
        stages=[StageRecord(**s) for s in getattr(bundle, "metadata", {}).get("stages", [])],
        opset=int(opset or DEFAULT_OPSET),
        extra=bundle_source_info(bundle),
    )
