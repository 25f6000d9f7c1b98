"""TVM artifacts: the compiled library, its parameters and a manifest, from an ONNX artifact.

The artifact folder holds ``model.so`` (or ``model.tar`` when no linker for the device exists
here), ``params.bin`` (the weights, in the order the ``main`` function takes them after the
input) and ``manifest.json`` with format ``tvm``. ``extra`` records the TVM target, the device,
how to load the library, whether the CPU code was tuned, and notes. When the code runs on this
machine, its outputs are compared with onnxruntime's on fixed inputs before the artifact is
written.
"""

from __future__ import annotations

import logging
import tempfile
import time
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
from export.tvm import compile as tc
from export.tvm.tuning import TuneBudget, open_databases
from export.tvm.tuning import tune as run_tuning
from export.verify import compare_outputs

log = logging.getLogger(__name__)

FORMAT = "tvm"
# Minimum SQNR of TVM against onnxruntime: fp32 graphs agree to rounding (~125 dB measured); QDQ
# graphs do not, because onnxruntime runs fused int8 kernels with its own requantization while TVM
# computes the dequantized arithmetic in fp32, so activations round differently (18.6 dB measured
# on an untrained CNN with random inputs, where logits are small). Below 15 dB the graph is wrong.
MIN_SQNR_DB = {"fp32": 40.0, "int8": 15.0}


def _tvm_version() -> str:
    try:
        from importlib.metadata import version

        return version("apache-tvm")
    except Exception:  # not installed as a distribution
        import tvm

        return str(tvm.__version__)


def _is_quantized(onnx_model: Any) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul") for n in onnx_model.graph.node)


def export_tvm_from_onnx(
    onnx_artifact: Artifact,
    target: Any,
    dest: str | Path,
    *,
    tune: str | int | TuneBudget | None = None,
    trials_per_task: int | None = None,
    database_dir: str | Path | None = None,
    batch: int = 1,
    verify: bool = True,
    use_database: bool = True,
) -> Artifact:
    """Compile an ONNX artifact (fp32 or QDQ) with TVM for ``target`` and write a TVM artifact.

    Args:
        onnx_artifact: the source artifact (format ``onnx*``), with a recorded input shape.
        target: a :class:`targets.Target`.
        dest: the artifact folder (replaced atomically).
        tune: MetaSchedule budget for CPU targets: ``"10m"``, ``"90s"``, ``200`` (trials), or None.
        trials_per_task: cap on the trials one task gets (default 16).
        database_dir: root of the tuning databases (default: the user cache, see
            :func:`export.tvm.tuning.default_database_root`).
        batch: the static batch size compiled in (sessions split larger batches).
        verify: compare with onnxruntime when the library runs on this machine.
        use_database: apply tuning records found in the databases (False: plain untuned build).

    Returns:
        The loaded, hash-verified artifact.

    Raises:
        UnsupportedExportError: an operator TVM cannot import or compile for the target (exit 3).
        ExportError: the compiled code disagrees with onnxruntime, or linking failed.
    """
    import onnx

    from export.tvm.tuning import TuneBudgetError

    if not onnx_artifact.manifest.format.startswith("onnx"):
        raise UnsupportedExportError(f"TVM compiles ONNX artifacts; got format {onnx_artifact.manifest.format!r}")
    if batch < 1:
        raise TuneBudgetError(f"batch must be at least 1, got {batch}")
    budget = TuneBudget.parse(tune, trials_per_task=trials_per_task)
    spec = onnx_artifact.manifest.inputs[0] if onnx_artifact.manifest.inputs else None
    sample_shape = [int(s) for s in spec.shape[1:]] if spec else []
    if not spec or not sample_shape or not all(s > 0 for s in sample_shape):
        raise ExportError(f"artifact {onnx_artifact.path} does not record a static input shape; re-export it")
    t0 = time.perf_counter()
    model = onnx.load(str(onnx_artifact.model_path))
    precision = "int8" if _is_quantized(model) else "fp32"
    mod, params = tc.import_onnx(model, spec.name, [batch, *sample_shape], target.name)
    tgt = tc.tvm_target(target)
    device = tc.device_kind(target)
    notes: list[str] = []
    tuning_info: dict[str, Any] = {"tuned": False}
    if device == "cpu":
        mod = tc.fuse_for_cpu(mod, tgt)
        if budget is not None and tc.is_cross(target):
            notes.append(
                f"not tuned: tuning for {target.name} measures on the device through the RPC runner; "
                "tuning on this machine (or under emulation) would pick schedules for the wrong CPU"
            )
            budget = None
        root = Path(database_dir) if database_dir else None
        if budget is not None:
            report = run_tuning(mod, tgt, dict(target.tvm), budget, root=root)
            tuning_info["tuning"] = report.to_dict()
            if not report.complete:
                notes.append(f"tuning budget ran out: {report.tasks_left} of {report.tasks} tasks untuned (rerun to resume)")
        if use_database:
            _, lookup, folders = open_databases(dict(target.tvm), root)
            before = mod
            mod = tc.apply_database(mod, tgt, lookup)
            applied = _count_applied(before, mod, tgt, lookup)
            tuning_info.update(tuned=applied["tasks"] > 0 and applied["applied"] == applied["tasks"],
                               tuned_tasks=applied["applied"], tasks=applied["tasks"],
                               databases=[str(f) for f in folders])  # fmt: skip
            if 0 < applied["applied"] < applied["tasks"]:
                notes.append(f"partly tuned: {applied['applied']} of {applied['tasks']} operators have tuned schedules")
        if not tuning_info["tuned"]:
            notes.append(
                "untuned TVM CPU code: expect it to be many times slower than onnxruntime; "
                "export with --tune 10m (or more) to tune it"
            )
    plan = tc.library_plan(target)
    if plan.note:
        notes.append(plan.note)
    executable = tc.build(mod, tgt)
    with artifact_writer(dest) as tmp:
        lib_path = tc.export_library(executable, tmp, plan)
        tc.save_params(params, tmp)
        check: dict[str, Any] = {}
        if verify and not tc.is_cross(target):
            check = _verify_against_onnxruntime(tmp, lib_path, onnx_artifact, batch, sample_shape, precision)
        elif verify:
            notes.append(f"outputs not verified here: the {target.name} code needs the device (compress check --rpc)")
        manifest = _manifest(onnx_artifact, target, lib_path, plan, device, precision, batch, sample_shape,
                             tuning_info, notes, check, time.perf_counter() - t0)  # fmt: skip
        write_manifest(tmp, manifest)
    log.info("compiled %s for %s (%s, %s)", onnx_artifact.manifest.model_name, target.name, precision,
             "tuned" if tuning_info["tuned"] else "untuned")  # fmt: skip
    return load_artifact(dest)


def _count_applied(before: Any, after: Any, tgt: Any, database: Any) -> dict[str, int]:
    """How many tuning tasks of ``before`` found a schedule in ``database``."""
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(before, tgt)
    hits = sum(1 for t in tasks if database.query_tuning_record(t.dispatched[0], tgt, t.task_name) is not None)
    del after
    return {"tasks": len(tasks), "applied": hits}


def _verify_against_onnxruntime(
    folder: Path, lib_path: Path, onnx_artifact: Artifact, batch: int, sample_shape: list[int], precision: str
) -> dict[str, Any]:
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((4 * batch, *sample_shape)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_artifact.model_path), opts, providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    out = run_local(lib_path, folder / tc.PARAMS_FILE, x, batch)
    check: dict[str, Any] = {**compare_outputs(ref, out), "reference": "onnxruntime"}
    if check["sqnr_db"] < MIN_SQNR_DB[precision]:
        raise ExportError(
            f"TVM output differs from onnxruntime: SQNR {check['sqnr_db']:.1f} dB < {MIN_SQNR_DB[precision]} dB "
            f"(max abs error {check['max_abs_error']:.3g}) for this {precision} model"
        )
    return check


def run_local(lib_path: Path, params_path: Path, x: np.ndarray, batch: int) -> np.ndarray:
    """Run a host library on ``x`` in chunks of the compiled ``batch`` (for verification)."""
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), dev)
    params = [tvm.runtime.tensor(p.numpy(), dev) for p in tc.load_params(params_path)]
    outs = []
    for i in range(0, len(x), batch):
        outs.append(vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x[i : i + batch]), dev), *params).numpy())
    return np.concatenate(outs)


def _manifest(
    src: Artifact, target: Any, lib_path: Path, plan: tc.LibraryPlan, device: str, precision: str, batch: int,
    sample_shape: list[int], tuning: dict[str, Any], notes: list[str], check: dict[str, Any], seconds: float,
) -> Manifest:  # fmt: skip
    m = src.manifest
    extra = {
        **{k: v for k, v in m.extra.items() if k != "notes"},
        "tvm_target": dict(target.tvm),
        "tvm_host": dict(target.tvm_host) if target.tvm_host else None,
        "device": device,
        "library": plan.suffix,
        "cross_compiler": plan.compiler,
        "params_file": tc.PARAMS_FILE,
        "batch": batch,
        "precision": precision,
        "source_format": m.format,
        "notes": notes,
        **tuning,
    }
    return Manifest(
        format=FORMAT,
        format_version=f"tvm-{_tvm_version()}-relax-vm",
        model_name=m.model_name,
        target=target.to_dict(),
        model_file=lib_path.name,
        inputs=[TensorSpec(name=m.inputs[0].name, shape=[batch, *sample_shape], dtype="float32")],
        outputs=m.outputs,
        preprocessing=m.preprocessing,
        stages=[*m.stages, StageRecord(stage="export-tvm", config={"target": target.name, "library": plan.suffix,
                                                                      "tuned": tuning.get("tuned", False)},
                                       seconds=round(seconds, 3))],  # fmt: skip
        parent_hash=src.hash,
        metrics={"export_check": check} if check else {},
        extra=extra,
    )


def export_tvm_format(source: Any, target: Any, out: str | Path, **options: Any) -> Artifact:
    """The ``tvm`` export format: a compress ``ModelBundle`` or an ONNX artifact -> TVM artifact.

    A bundle (anything with ``.module``) is exported to ONNX first (verified against torch), then
    compiled. Options: ``tune``, ``trials_per_task``, ``database_dir``, ``batch``, ``opset``,
    ``verify``, ``use_database``.
    """
    opts = {k: v for k, v in options.items() if k in ("tune", "trials_per_task", "database_dir", "batch", "verify",
                                                       "use_database") and v is not None}  # fmt: skip
    unknown = set(options) - {"tune", "trials_per_task", "database_dir", "batch", "verify", "use_database", "opset"}
    if unknown:
        raise ExportError(f"unknown TVM export options {sorted(unknown)}; valid: batch, database_dir, opset, tune, "
                          "trials_per_task, use_database, verify")  # fmt: skip
    if isinstance(source, Artifact):
        return export_tvm_from_onnx(source, target, out, **opts)
    if not hasattr(source, "module"):
        raise ExportError(f"cannot export a {type(source).__name__} to TVM; give a checkpoint bundle or an ONNX artifact")
    from export.onnx_export import export_onnx

    with tempfile.TemporaryDirectory(prefix="edgecompress-tvm-") as tmp:
        onnx_art = export_onnx(
            source.module, tuple(source.input_shape), Path(tmp) / "onnx", target=target,
            model_name=source.model_name, preprocessing=source.preprocessing,
            stages=[StageRecord(**s) for s in getattr(source, "metadata", {}).get("stages", [])],
            opset=int(options.get("opset") or 17), extra=_source_info(source),
        )  # fmt: skip
        return export_tvm_from_onnx(onnx_art, target, out, **opts)


def _source_info(bundle: Any) -> dict[str, Any]:
    """Where the model came from, so ``compress check`` can rebuild the torch reference."""
    from export.artifact import sha256_file

    info: dict[str, Any] = {"model_name": bundle.model_name, "input_shape": list(bundle.input_shape)}
    src = getattr(bundle, "source", None)
    if src and Path(src).is_file():
        info["source_checkpoint"] = str(Path(src).resolve())
        info["source_sha256"] = sha256_file(Path(src))
    return info
