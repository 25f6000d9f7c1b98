"""torch -> ONNX artifacts: opset >= 17, dynamic batch, checked, shape-inferred, verified on onnxruntime.

Techniques whose modules need a special graph (QDQ quantizers, packed codebooks) pass their
:class:`OnnxExporter` in ``exporters`` (the compress layer's registry lists them); everything else
goes through ``torch.onnx.export``. After writing, the ONNX model is checked with ``onnx.checker``, shapes are
inferred, and onnxruntime's outputs are compared with torch's on fixed inputs; the max absolute
error and SQNR go into the manifest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.export.artifact import (
    Artifact,
    Manifest,
    StageRecord,
    TensorSpec,
    artifact_writer,
    load_artifact,
    write_manifest,
)
from edgecompress.export.errors import ExportError, UnsupportedExportError
from edgecompress.export.spec import Feeds, ModelSpec, as_feeds
from edgecompress.export.torch_io import ExportIO
from edgecompress.export.verify import compare_all_outputs

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class OnnxExporter:
    """A custom torch -> ONNX path for modules that ``predicate`` recognises.

    ``export(module, io, path, opset)`` writes the ONNX file; ``io`` is an
    :class:`~export.torch_io.ExportIO` (example args, input/output names, dynamic axes) to hand to
    :func:`torch_onnx_export`. ``format`` names the artifact format (``onnx-qdq``,
    ``onnx-codebook``), ``min_sqnr_db`` the verification threshold.
    """

    name: str
    predicate: Callable[[Any], bool]
    export: Callable[[Any, ExportIO, Path, int], None]
    format: str = "onnx"
    min_sqnr_db: float = 40.0


def torch_onnx_export(module: Any, io: ExportIO, path: Path, opset: int, **kwargs: Any) -> None:
    """``torch.onnx.export`` as every exporter here calls it: the TorchScript path, the model's
    input/output names, a dynamic batch (and the spec's named dims) and constant folding
    (``kwargs`` adds e.g. ``custom_opsets``). Dict and tuple outputs are flattened in order."""
    import warnings

    import torch

    from edgecompress.export.torch_io import flat_outputs_module

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            flat_outputs_module(module),
            io.args,
            str(path),
            dynamo=False,  # the TorchScript exporter: 10x faster here and stable for these models
            opset_version=opset,
            input_names=io.input_names,
            output_names=io.output_names,
            dynamic_axes=io.dynamic_axes,
            do_constant_folding=True,
            **kwargs,
        )


def _exported_program_export(program: Any, io: ExportIO, path: Path, opset: int) -> None:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(program, io.args, str(path), dynamo=True, opset_version=max(opset, 18),
                          input_names=io.input_names, output_names=io.output_names, verbose=False)  # fmt: skip


def _sort_initializers(model: Any) -> None:
    """Initializers in name order: the same weights give the same file, whatever order the module
    registered its parameters in (a model reloaded from its checkpoint, or the one still in memory)."""
    import onnx

    ordered = []
    for init in sorted(model.graph.initializer, key=lambda i: i.name):
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        ordered.append(copy)
    del model.graph.initializer[:]
    model.graph.initializer.extend(ordered)


def _program_batch(program: Any) -> int | None:
    """The batch size a torch.export program was exported with (None when it is dynamic)."""
    for node in program.graph.nodes:
        if node.op == "placeholder" and "val" in node.meta and node.name in program.graph_signature.user_inputs:
            dim = node.meta["val"].shape[0]
            return int(dim) if isinstance(dim, int) else None
    return None


def _pick_exporter(module: Any, exporters: Sequence[OnnxExporter]) -> OnnxExporter:
    import torch

    if isinstance(module, torch.export.ExportedProgram):
        return OnnxExporter("torch.export+dynamo", lambda m: True, _exported_program_export, "onnx", 40.0)
    for exp in exporters:
        if exp.predicate(module):
            return exp
    return OnnxExporter("torch.onnx", lambda m: True, torch_onnx_export, "onnx", 40.0)


def onnx_outputs(onnx_path: Path | str, inputs: Feeds | np.ndarray, *, batch_size: int = 256) -> list[np.ndarray]:
    """Every output of the ONNX model at ``onnx_path`` on onnxruntime's CPU provider (the reference
    the export checks compare with; runtimes.ort_runtime runs artifacts with the target's settings).

    Inputs are cast to the graph's input dtypes and run in batches of ``batch_size``.
    """
    from edgecompress.export.ort_session import ort_session
    from edgecompress.export.spec import batch_size as feeds_batch
    from edgecompress.export.spec import dtype_name, numpy_dtype, slice_feeds

    sess = ort_session(onnx_path)
    graph_inputs = sess.get_inputs()
    feeds = as_feeds(inputs, [i.name for i in graph_inputs])
    casts = {i.name: numpy_dtype(dtype_name(i.type)) for i in graph_inputs}
    n = feeds_batch(feeds)
    parts: list[list[np.ndarray]] = []
    for start in range(0, max(n, 1), batch_size):
        chunk = {k: np.ascontiguousarray(v, dtype=casts[k]) for k, v in slice_feeds(feeds, start, start + batch_size).items()}
        parts.append(sess.run(None, chunk))
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def verify_onnx_against_torch(module: Any, onnx_path: Path, inputs: Feeds | np.ndarray,
                              spec: ModelSpec | None = None) -> dict[str, float]:  # fmt: skip
    """Run ``inputs`` through torch and onnxruntime and compare every output."""
    from edgecompress.export.torch_io import run_module

    spec = spec or ModelSpec.single(np.asarray(inputs).shape[1:])
    feeds = as_feeds(inputs, spec.input_names)
    return compare_all_outputs(run_module(module, feeds, spec), onnx_outputs(onnx_path, feeds))


def export_onnx(
    module: Any,
    spec: ModelSpec | tuple[int, ...],
    dest: str | Path,
    *,
    target: Any = None,
    model_name: str = "",
    preprocessing: dict[str, Any] | None = None,
    stages: list[StageRecord] | None = None,
    parent_hash: str | None = None,
    opset: int = DEFAULT_OPSET,
    verify_inputs: Feeds | np.ndarray | None = None,
    extra: dict[str, Any] | None = None,
    exporters: Sequence[OnnxExporter] = (),
) -> Artifact:
    """Export a torch module to an ONNX artifact folder and verify it on onnxruntime.

    Args:
        module: the model (put in eval mode; not modified).
        spec: the model's inputs (and outputs, probed from the module when not given); a tuple is
            one float input of that shape without the batch dimension.
        dest: the artifact folder to create (replaced atomically if it exists).
        target: a :class:`targets.Target` recorded in the manifest.
        model_name, preprocessing, stages, parent_hash, extra: recorded in the manifest.
        opset: ONNX opset (at least 17).
        verify_inputs: feeds for the torch-vs-onnxruntime check (default: 8 fixed random samples).
        exporters: custom exporters, tried in order; the first whose predicate accepts the module
            writes the file (default and fallback: ``torch.onnx.export``).

    Returns:
        The loaded, hash-verified artifact.

    Raises:
        UnsupportedExportError: an operator cannot be exported (the message names it).
        SpecError: the inputs do not fit the model, or a non-batch dim is dynamic without a size.
        ExportError: the exported graph is invalid or disagrees with torch beyond the threshold.
    """
    import onnx
    import torch

    from edgecompress.export.torch_io import ExportIO, model_spec_for

    if opset < 17:
        raise ExportError(f"opset {opset} is too old; use 17 or newer")
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec.single(spec)
    exporter = _pick_exporter(module, exporters)
    batch, check_batch = 1, 8
    if isinstance(module, torch.export.ExportedProgram):
        # A program keeps the shapes it was exported with: a static batch stays static in ONNX.
        batch = check_batch = _program_batch(module) or 1
        program, module = module, module.module()
    else:
        program = module
        module.eval()
    spec = model_spec_for(module, spec)
    # Named (dynamic) non-batch dims are traced at a size: 8 unless the spec fixes them.
    traced = _traceable(spec)
    example = traced.example_feeds(batch, seed=0)
    check_feeds = as_feeds(verify_inputs, spec.input_names) if verify_inputs is not None else traced.example_feeds(check_batch, seed=1)
    io = ExportIO.build(spec, example, dynamic_batch=program is module)
    t0 = time.perf_counter()
    with artifact_writer(dest) as tmp:
        onnx_path = tmp / MODEL_FILE
        try:
            exporter.export(program, io, onnx_path, opset)
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
        _sort_initializers(model)
        onnx.save(model, str(onnx_path))
        check = verify_onnx_against_torch(module, onnx_path, check_feeds, spec)
        if check["sqnr_db"] < exporter.min_sqnr_db:
            raise ExportError(
                f"onnxruntime output differs from torch: SQNR {check['sqnr_db']:.1f} dB < {exporter.min_sqnr_db} dB "
                f"(max abs error {check['max_abs_error']:.3g}); the export is wrong for this model"
            )
        graph = ModelSpec.from_onnx(model)
        inputs = [i if program is module else TensorSpec(name=i.name, shape=[batch, *i.shape[1:]], dtype=i.dtype,
                                                         range=i.range) for i in spec.inputs]  # fmt: skip
        manifest = Manifest(
            format=exporter.format,
            format_version=f"onnx-ir{model.ir_version}-opset{opset}",
            model_name=model_name,
            target=target.to_dict() if target is not None else {},
            model_file=MODEL_FILE,
            inputs=inputs,
            outputs=graph.outputs,
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


TRACE_DIM = 8


def _traceable(spec: ModelSpec) -> ModelSpec:
    """``spec`` with named non-batch dims set to :data:`TRACE_DIM` (they stay dynamic in the graph)."""
    return ModelSpec([TensorSpec(name=i.name, shape=[i.shape[0], *[d if isinstance(d, int) else TRACE_DIM
                                                                    for d in i.shape[1:]]],
                                 dtype=i.dtype, range=i.range) for i in spec.inputs], list(spec.outputs))  # fmt: skip


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
            inputs=inputs or ModelSpec.from_onnx(onnx_model).inputs,
            outputs=ModelSpec.from_onnx(onnx_model).outputs,
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
    from edgecompress.export.artifact import sha256_file

    info: dict[str, Any] = {"model_name": bundle.model_name, "model_spec": bundle.spec.to_json()}
    if getattr(bundle, "task", None):
        info["task"] = bundle.task  # picks the default metric on unlabelled data
    src = getattr(bundle, "source", None)
    if src and Path(src).is_file():
        info["source_checkpoint"] = str(Path(src).resolve())
        info["source_sha256"] = sha256_file(Path(src))
    return info


def export_bundle_onnx(bundle: Any, dest: str | Path, *, target: Any = None, opset: int | None = None,
                       exporters: Sequence[OnnxExporter] = (), stages: list[StageRecord] | None = None,
                       extra: dict[str, Any] | None = None, verify_inputs: Feeds | None = None) -> Artifact:  # fmt: skip
    """Export a loaded checkpoint (duck-typed ``ModelBundle``: ``module``, ``spec``, ``model_name``,
    ``preprocessing``, ``metadata``, optional ``exported_program``) to a verified ONNX artifact, with
    its stage lineage (``stages``, default the bundle's recorded ones), its source and ``extra``
    recorded. Every format that starts from ONNX (tvm, ort) uses this."""
    program = getattr(bundle, "exported_program", None)
    if stages is None:
        stages = [StageRecord(**s) for s in getattr(bundle, "metadata", {}).get("stages", [])]
    return export_onnx(
        program if program is not None else bundle.module,
        bundle.spec,
        dest,
        target=target,
        model_name=bundle.model_name,
        preprocessing=bundle.preprocessing,
        stages=stages,
        opset=int(opset or DEFAULT_OPSET),
        verify_inputs=verify_inputs,
        extra={**bundle_source_info(bundle), **(extra or {})},
        exporters=exporters,
    )
