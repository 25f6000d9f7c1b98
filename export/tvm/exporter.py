"""TVM artifacts: the compiled library, its parameters and a manifest, from an ONNX artifact or a
``torch.export`` program (imported directly with TVM's PyTorch frontend, no ONNX in between).

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
from collections.abc import Callable
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
from export.onnx_export import bundle_source_info
from export.tvm import compile as tc
from export.tvm.rpc_measure import MeasureDevice, TuningNeedsDeviceError
from export.tvm.tuning import TuneBudget, has_records, open_databases
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
    device: MeasureDevice | None = None,
) -> Artifact:
    """Compile an ONNX artifact (fp32 or QDQ) with TVM for ``target`` and write a TVM artifact.

    Args:
        onnx_artifact: the source artifact (format ``onnx*``), with a recorded input shape.
        target: a :class:`targets.Target`.
        dest: the artifact folder (replaced atomically).
        tune: MetaSchedule budget: ``"10m"``, ``"90s"``, ``200`` (trials), or None.
        trials_per_task: cap on the trials one task gets (default 16).
        database_dir: root of the tuning databases (default: the user cache, see
            :func:`export.tvm.tuning.default_database_root`).
        batch: the static batch size compiled in (sessions split larger batches).
        verify: compare with onnxruntime when the library runs on this machine.
        use_database: apply tuning records found in the databases (False: plain untuned build).
        device: the device that times tuning candidates over TVM RPC (``runtimes.tvm_rpc.
            open_measure_device``); required to tune a target whose code does not run here
            (ARM64, GPUs), optional for the host CPU (None: timed in this process).

    Returns:
        The loaded, hash-verified artifact.

    Raises:
        UnsupportedExportError: an operator TVM cannot import or compile for the target (exit 3).
        TuningNeedsDeviceError: ``tune`` for a cross target without ``device`` (exit 2).
        TuningDeviceError: the device stopped answering while tuning; records so far are kept (exit 3).
        ExportError: the compiled code disagrees with onnxruntime, or linking failed.
    """
    import onnx

    from export.tvm.tuning import TuneBudgetError

    if not onnx_artifact.manifest.format.startswith("onnx"):
        raise UnsupportedExportError(f"TVM compiles ONNX artifacts; got format {onnx_artifact.manifest.format!r}")
    if batch < 1:
        raise TuneBudgetError(f"batch must be at least 1, got {batch}")
    budget = TuneBudget.parse(tune, trials_per_task=trials_per_task)
    require_tuning_device(target, budget, device)
    spec = onnx_artifact.manifest.inputs[0] if onnx_artifact.manifest.inputs else None
    sample_shape = [int(s) for s in spec.shape[1:]] if spec else []
    if not spec or not sample_shape or not all(s > 0 for s in sample_shape):
        raise ExportError(f"artifact {onnx_artifact.path} does not record a static input shape; re-export it")
    t0 = time.perf_counter()
    model = onnx.load(str(onnx_artifact.model_path))
    precision = "int8" if _is_quantized(model) else "fp32"
    mod, params = tc.import_onnx(model, spec.name, [batch, *sample_shape], target.name)

    def check_fn(folder: Path, lib_path: Path) -> dict[str, Any]:
        return _verify_against_onnxruntime(folder, lib_path, onnx_artifact, batch, sample_shape, precision)

    return _compile_and_write(mod, params, onnx_artifact.manifest, onnx_artifact.hash, target, dest, budget=budget,
                              database_dir=database_dir, batch=batch, sample_shape=sample_shape, precision=precision,
                              verify=verify, use_database=use_database, check_fn=check_fn, t0=t0,
                              measure=device)  # fmt: skip


def require_tuning_device(target: Any, budget: TuneBudget | str | int | None, device: MeasureDevice | None) -> None:
    """Tuning code that runs on another device needs that device: never tune it here or skip silently.

    Raises:
        TuningNeedsDeviceError: a tuning budget for a cross target (ARM64, GPU) without a device.
    """
    if budget is None or device is not None or not tc.is_cross(target):
        return
    raise TuningNeedsDeviceError(
        f"tuning for {target.name} measures every candidate on the device, so it needs one: add --rpc HOST:PORT "
        f"--key K (a 'compress device-server --key K' running on the device) or --tracker HOST:PORT --key K "
        "(a TVM tracker of devices), or in a recipe's export entry rpc:/tracker: and key:. Emulators are refused. "
        "Without --tune the artifact is built with the records already in the target's database"
    )


def _compile_and_write(
    mod: Any, params: list[Any], src: Manifest, parent_hash: str | None, target: Any, dest: str | Path, *,
    budget: TuneBudget | None, database_dir: str | Path | None, batch: int, sample_shape: list[int], precision: str,
    verify: bool, use_database: bool, check_fn: Callable[[Path, Path], dict[str, Any]], t0: float,
    measure: MeasureDevice | None = None,
) -> Artifact:  # fmt: skip
    """Fuse, tune or apply tuning records, build, write the library + params + manifest, verify."""
    tgt = tc.tvm_target(target)
    device = tc.device_kind(target)
    notes: list[str] = []
    tuning_info: dict[str, Any] = {"tuned": False}
    root = Path(database_dir) if database_dir else None
    plan = tc.library_plan(target)
    # GPU code is scheduled by TVM's default GPU pipeline; it goes through the tuning tasks only when
    # tuning, or when the target's database holds records to apply.
    if device == "cpu" or budget is not None or (use_database and _has_tuning_records(target, root)):
        mod = tc.fuse_for_cpu(mod, tgt)
        if budget is not None:
            report = run_tuning(mod, tgt, dict(target.tvm), budget, root=root, device=measure, plan=plan)
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
        if device == "cpu" and not tuning_info["tuned"]:
            how = " on the device (--rpc HOST:PORT or --tracker HOST:PORT with --key)" if tc.is_cross(target) else ""
            notes.append(
                "untuned TVM CPU code: expect it to be many times slower than onnxruntime; "
                f"export with --tune 10m (or more){how} to tune it"
            )
    if plan.note:
        notes.append(plan.note)
    executable = tc.build(mod, tgt)
    with artifact_writer(dest) as tmp:
        lib_path = tc.export_library(executable, tmp, plan)
        tc.save_params(params, tmp)
        check: dict[str, Any] = {}
        if verify and not tc.is_cross(target):
            check = check_fn(tmp, lib_path)
        elif verify:
            notes.append(f"outputs not verified here: the {target.name} code needs the device (compress check --rpc)")
        manifest = _manifest(src, parent_hash, target, lib_path, plan, device, precision, batch, sample_shape,
                             tuning_info, notes, check, time.perf_counter() - t0)  # fmt: skip
        write_manifest(tmp, manifest)
    log.info("compiled %s for %s (%s, %s)", src.model_name, target.name, precision,
             "tuned" if tuning_info["tuned"] else "untuned")  # fmt: skip
    return load_artifact(dest)


def export_tvm_from_program(
    bundle: Any,
    target: Any,
    dest: str | Path,
    *,
    tune: str | int | TuneBudget | None = None,
    trials_per_task: int | None = None,
    database_dir: str | Path | None = None,
    batch: int | None = None,
    verify: bool = True,
    use_database: bool = True,
    device: MeasureDevice | None = None,
) -> Artifact:
    """Compile a ``torch.export`` program (``bundle.exported_program``, a ``.pt2`` input) with TVM's
    PyTorch frontend directly, without going through ONNX, and write a TVM artifact.

    The manifest's ``extra["source_format"]`` is ``"torch.export"``; when the code runs here its
    outputs are compared with the program's own (``program.module()``). ``batch`` defaults to the
    program's static batch (1 when it is dynamic). Other arguments as :func:`export_tvm_from_onnx`.

    Raises:
        UnsupportedExportError: an operator TVM cannot import or compile for the target (exit 3).
        ExportError: the compiled code disagrees with torch, or linking failed.
    """
    import torch

    from export.tvm.tuning import TuneBudgetError

    program = bundle.exported_program
    budget = TuneBudget.parse(tune, trials_per_task=trials_per_task)
    require_tuning_device(target, budget, device)
    sample_shape = [int(s) for s in bundle.input_shape]
    static = _program_static_batch(program)
    if batch is None:
        batch = static or 1
    if batch < 1:
        raise TuneBudgetError(f"batch must be at least 1, got {batch}")
    t0 = time.perf_counter()
    mod, params = tc.import_exported_program(program, batch, target.name)
    reference = program.module()
    with torch.no_grad():
        example = reference(torch.zeros((batch, *sample_shape)))
    out0 = example[0] if isinstance(example, (tuple, list)) else example
    user_inputs = [s.arg.name for s in program.graph_signature.input_specs
                   if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]  # fmt: skip
    src = Manifest(
        format="torch.export",
        model_name=bundle.model_name,
        model_file=Path(getattr(bundle, "source", None) or "program.pt2").name,
        inputs=[TensorSpec(name=user_inputs[0] if user_inputs else "input", shape=[batch, *sample_shape])],
        outputs=[TensorSpec(name="output", shape=[int(d) for d in out0.shape])],
        preprocessing=dict(getattr(bundle, "preprocessing", None) or {}),
        stages=[StageRecord(**s) for s in getattr(bundle, "metadata", {}).get("stages", [])],
        extra={**bundle_source_info(bundle), "importer": "tvm.relax.frontend.torch.from_exported_program"},
    )

    def check_fn(folder: Path, lib_path: Path) -> dict[str, Any]:
        return _verify_against_torch(folder, lib_path, reference, batch, sample_shape)

    return _compile_and_write(mod, params, src, None, target, dest, budget=budget, database_dir=database_dir,
                              batch=batch, sample_shape=sample_shape, precision="fp32", verify=verify,
                              use_database=use_database, check_fn=check_fn, t0=t0, measure=device)  # fmt: skip


def _program_static_batch(program: Any) -> int | None:
    """The static batch size of the program's first user input (None when it is dynamic)."""
    import torch

    user = [s.arg.name for s in program.graph_signature.input_specs
            if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]  # fmt: skip
    for node in program.graph.nodes:
        if node.op == "placeholder" and user and node.name == user[0] and "val" in node.meta:
            d0 = node.meta["val"].shape[0]
            return int(d0) if isinstance(d0, int) else None
    return None


def _verify_against_torch(
    folder: Path, lib_path: Path, reference: Any, batch: int, sample_shape: list[int]
) -> dict[str, Any]:
    import torch

    x = np.random.default_rng(0).standard_normal((4 * batch, *sample_shape)).astype(np.float32)
    with torch.no_grad():
        refs = []
        for i in range(0, len(x), batch):
            r = reference(torch.from_numpy(x[i : i + batch]))
            refs.append((r[0] if isinstance(r, (tuple, list)) else r).numpy())
    ref = np.concatenate(refs)
    out = run_local(lib_path, folder / tc.PARAMS_FILE, x, batch)
    check: dict[str, Any] = {**compare_outputs(ref, out), "reference": "torch (torch.export program)"}
    if check["sqnr_db"] < MIN_SQNR_DB["fp32"]:
        raise ExportError(
            f"TVM output differs from torch: SQNR {check['sqnr_db']:.1f} dB < {MIN_SQNR_DB['fp32']} dB "
            f"(max abs error {check['max_abs_error']:.3g}) for this torch.export program"
        )
    return check


def _has_tuning_records(target: Any, root: Path | None) -> bool:
    user, _, folders = open_databases(dict(target.tvm), root)
    return has_records(user, folders)


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
    m: Manifest, parent_hash: str | None, target: Any, lib_path: Path, plan: tc.LibraryPlan, device: str, precision: str, batch: int,
    sample_shape: list[int], tuning: dict[str, Any], notes: list[str], check: dict[str, Any], seconds: float,
) -> Manifest:  # fmt: skip
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
        parent_hash=parent_hash,
        metrics={"export_check": check} if check else {},
        extra=extra,
    )


def export_tvm_format(source: Any, target: Any, out: str | Path, **options: Any) -> Artifact:
    """The ``tvm`` export format: a compress ``ModelBundle`` or an ONNX artifact -> TVM artifact.

    A bundle (anything with ``.module``) is exported to ONNX first (verified against torch), then
    compiled; a bundle with ``exported_program`` set (a ``.pt2`` input) is imported directly from
    the program instead (:func:`export_tvm_from_program`). Options: ``tune``, ``trials_per_task``,
    ``database_dir``, ``batch``, ``opset``, ``verify``, ``use_database``, ``device`` (a
    :class:`~export.tvm.rpc_measure.MeasureDevice` that times tuning candidates).
    """
    valid = ("tune", "trials_per_task", "database_dir", "batch", "verify", "use_database", "device")
    opts = {k: v for k, v in options.items() if k in valid and v is not None}
    unknown = set(options) - {*valid, "opset"}
    if unknown:
        raise ExportError(f"unknown TVM export options {sorted(unknown)}; valid: {', '.join(sorted({*valid, 'opset'}))}")
    require_tuning_device(target, opts.get("tune"), opts.get("device"))  # before any exporting: fail fast
    if isinstance(source, Artifact):
        return export_tvm_from_onnx(source, target, out, **opts)
    if not hasattr(source, "module"):
        raise ExportError(f"cannot export a {type(source).__name__} to TVM; give a checkpoint bundle or an ONNX artifact")
    if getattr(source, "exported_program", None) is not None:
        prog_opts = {k: v for k, v in opts.items() if k != "batch"}
        return export_tvm_from_program(source, target, out, batch=opts.get("batch"), **prog_opts)
    from export.onnx_export import export_bundle_onnx

    with tempfile.TemporaryDirectory(prefix="edgecompress-tvm-") as tmp:
        onnx_art = export_bundle_onnx(source, Path(tmp) / "onnx", target=target, opset=options.get("opset"))
        return export_tvm_from_onnx(onnx_art, target, out, **opts)

