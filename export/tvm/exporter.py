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

from edgecompress.export.artifact import (
    Artifact,
    Manifest,
    StageRecord,
    TensorSpec,
    artifact_writer,
    load_artifact,
    write_manifest,
)
from edgecompress.export.errors import CompiledOutputError, ExportError, UnsupportedExportError
from edgecompress.export.onnx_export import bundle_source_info
from edgecompress.export.spec import ModelSpec
from edgecompress.export.tvm import compile as tc
from edgecompress.export.tvm.int8 import Int8Kernels
from edgecompress.export.tvm.records import has_any_records
from edgecompress.export.tvm.rpc_measure import TuningNeedsDeviceError
from edgecompress.export.tvm.safe_build import build_verified, choose_records, describe
from edgecompress.export.tvm.tuning import TuneBudget
from edgecompress.export.tvm.tuning import tune as run_tuning
from edgecompress.export.tvm.workers import CandidateRunner
from edgecompress.export.verify import compare_all_outputs

log = logging.getLogger(__name__)

FORMAT = "tvm"
# Minimum SQNR of TVM against onnxruntime: fp32 graphs agree to rounding (~125 dB measured); QDQ
# graphs do not, because onnxruntime runs fused int8 kernels with its own requantization while TVM
# computes the dequantized arithmetic in fp32, so activations round differently (18.6 dB measured
# on an untrained CNN with random inputs, where logits are small). Below 15 dB the graph is wrong.
# With integer kernels (export/tvm/int8.py) every convolution and matrix product requantizes as
# onnxruntime's QLinearConv/QGemm do, bit for bit: EfficientNet-Lite1's int8 graph then matches
# onnxruntime exactly (max abs error 0), so a model lowered completely is held to 30 dB.
MIN_SQNR_DB = {"fp32": 40.0, "int8": 15.0, "int8-kernels": 30.0}


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
    device: CandidateRunner | None = None,
    builds: Any = None,
    progress: Callable[[str], None] | None = None,
    int8_kernels: bool = True,
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
            open_tuning_device``); required to tune a target whose code does not run here
            (ARM64, GPUs), optional for the host CPU (None: timed in this process).
        builds: compiles tuning candidates elsewhere (a Ray cluster, ``compress.cluster.RayBuilds``;
            see :func:`export.tvm.tuning.tune`); None compiles them in this process.
        progress: called with a line of text per tuning round (task, trials, best, time left);
            None logs them.
        int8_kernels: run a QDQ graph's convolutions and matrix products on 8-bit integers
            (:mod:`edgecompress.export.tvm.int8`; the manifest's ``extra["int8_kernels"]`` counts them);
            False computes them in float as the graph is written. If the integer build disagrees
            with onnxruntime, the float path is built instead, with a note.

    Returns:
        The loaded, hash-verified artifact.

    Raises:
        UnsupportedExportError: an operator TVM cannot import or compile for the target (exit 3).
        TuningNeedsDeviceError: ``tune`` for a cross target without ``device`` (exit 2).
        TuningDeviceError: the device stopped answering while tuning; records so far are kept (exit 3).
        CompiledOutputError: the compiled code disagrees with onnxruntime even without tuning
            records (exit 3; wrong records are quarantined and the model rebuilt without them).
        ExportError: linking failed.
    """
    import onnx

    from edgecompress.export.tvm.tuning import TuneBudgetError

    if not onnx_artifact.manifest.format.startswith("onnx"):
        raise UnsupportedExportError(f"TVM compiles ONNX artifacts; got format {onnx_artifact.manifest.format!r}")
    if batch < 1:
        raise TuneBudgetError(f"batch must be at least 1, got {batch}")
    budget = TuneBudget.parse(tune, trials_per_task=trials_per_task)
    require_tuning_device(target, budget, device)
    if not onnx_artifact.manifest.inputs:
        raise ExportError(f"artifact {onnx_artifact.path} does not record its inputs; re-export it")
    spec = ModelSpec(list(onnx_artifact.manifest.inputs))
    shapes = spec.shape_dict(batch)  # SpecError naming a dynamic dim and the --input that fixes it
    t0 = time.perf_counter()
    model = onnx.load(str(onnx_artifact.model_path))
    precision = "int8" if _is_quantized(model) else "fp32"
    static = _static_inputs(spec, batch)

    def compile_with(kernels: Int8Kernels) -> Artifact:
        rewrite = kernels.rewrite if kernels.enabled else None
        mod, params = tc.import_onnx(model, shapes, target.name, {i.name: i.dtype for i in spec.inputs},
                                     graph_rewrite=rewrite)  # fmt: skip
        min_sqnr = MIN_SQNR_DB["int8-kernels" if kernels.exact else precision]

        def check_fn(folder: Path, lib_path: Path) -> dict[str, Any]:
            return _verify_against_onnxruntime(folder, lib_path, onnx_artifact, batch, static, precision, min_sqnr)

        return _compile_and_write(mod, params, onnx_artifact.manifest, onnx_artifact.hash, target, dest, budget=budget,
                                  database_dir=database_dir, batch=batch, inputs=static.inputs, precision=precision,
                                  verify=verify, use_database=use_database, check_fn=check_fn, t0=t0,
                                  measure=device, builds=builds, progress=progress,
                                  extra={"int8_kernels": kernels.manifest()} if precision == "int8" else None,
                                  notes=kernels.notes())  # fmt: skip

    kernels = Int8Kernels.for_target(tc.tvm_target(target), enabled=int8_kernels and precision == "int8",
                                     off_reason="" if int8_kernels else "int8_kernels=False")  # fmt: skip
    try:
        return compile_with(kernels)
    except CompiledOutputError as exc:
        if not kernels.applied:
            raise
        # the integer kernels are an optimization: never the reason an export fails
        log.warning("TVM with int8 kernels disagrees with onnxruntime (%s); building the float path", exc)
        return compile_with(Int8Kernels(enabled=False, off_reason=f"the integer build disagreed with onnxruntime ({exc}); "
                                                                  "built with the float path"))  # fmt: skip


def require_tuning_device(target: Any, budget: TuneBudget | str | int | None, device: CandidateRunner | None) -> None:
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
    budget: TuneBudget | None, database_dir: str | Path | None, batch: int, inputs: list[TensorSpec], precision: str,
    verify: bool, use_database: bool, check_fn: Callable[[Path, Path], dict[str, Any]], t0: float,
    measure: CandidateRunner | None = None, builds: Any = None, progress: Callable[[str], None] | None = None,
    extra: dict[str, Any] | None = None, notes: list[str] | None = None,
) -> Artifact:  # fmt: skip
    """Fuse, tune or apply tuning records, build, write the library + params + manifest, verify;
    ``extra`` and ``notes`` go into the manifest as well."""
    tgt = tc.tvm_target(target)
    device = tc.device_kind(target)
    notes = list(notes or [])
    tuning_info: dict[str, Any] = {"tuned": False}
    root = Path(database_dir) if database_dir else None
    plan = tc.library_plan(target)
    # GPU code is scheduled by TVM's default GPU pipeline; it goes through the tuning tasks only when
    # tuning, or when the target's database holds records to apply.
    selection = None
    if device == "cpu" or budget is not None or (use_database and has_any_records(dict(target.tvm), root)):
        mod = tc.fuse_for_cpu(mod, tgt)
        if budget is not None:
            report = run_tuning(mod, tgt, dict(target.tvm), budget, root=root, device=measure, plan=plan, builds=builds,
                                progress=progress)  # fmt: skip
            tuning_info["tuning"] = report.to_dict()
            if not report.complete:
                notes.append(f"tuning budget ran out: {report.tasks_left} of {report.tasks} tasks untuned (rerun to resume)")
        if use_database:
            selection = choose_records(mod, tgt, target, root)
        else:
            notes.append("tuning records not used (--no-tuned-records)")
    if plan.note:
        notes.append(plan.note)
    checking = verify and not tc.is_cross(target)
    if verify and not checking:
        notes.append(f"outputs not verified here: the {target.name} code needs the device (compress check --rpc)")
    with artifact_writer(dest) as tmp:
        tc.save_params(params, tmp)
        built = build_verified(mod, tgt, selection, tmp, plan, check_fn if checking else None, target.name)
        lib_path, check = built.lib_path, built.check
        if selection is not None:  # described after the build: a repair may have refused records
            info, more = describe(selection, dict(target.tvm))
            tuning_info.update(info)
            notes.extend(more)
        notes.extend(built.notes)
        if device == "cpu" and not tuning_info["tuned"]:
            how = " on the device (--rpc HOST:PORT or --tracker HOST:PORT with --key)" if tc.is_cross(target) else ""
            notes.append(
                "untuned TVM CPU code: expect it to be many times slower than onnxruntime; "
                f"export with --tune 10m (or more){how} to tune it"
            )
        manifest = _manifest(src, parent_hash, target, lib_path, plan, device, precision, batch, inputs,
                             {**tuning_info, **(extra or {})}, notes, check, time.perf_counter() - t0)  # fmt: skip
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
    device: CandidateRunner | None = None,
    builds: Any = None,
    progress: Callable[[str], None] | None = None,
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

    from edgecompress.export.tvm.tuning import TuneBudgetError

    program = bundle.exported_program
    budget = TuneBudget.parse(tune, trials_per_task=trials_per_task)
    require_tuning_device(target, budget, device)
    static = _program_static_batch(program)
    if batch is None:
        batch = static or 1
    if batch < 1:
        raise TuneBudgetError(f"batch must be at least 1, got {batch}")
    t0 = time.perf_counter()
    mod, params = tc.import_exported_program(program, batch, target.name)
    reference = program.module()
    from edgecompress.export.torch_io import probe_outputs

    spec = _static_inputs(bundle.spec, batch)
    spec = ModelSpec(spec.inputs, probe_outputs(reference, spec, batch))
    src = Manifest(
        format="torch.export",
        model_name=bundle.model_name,
        model_file=Path(getattr(bundle, "source", None) or "program.pt2").name,
        inputs=spec.inputs,
        outputs=spec.outputs,
        preprocessing=dict(getattr(bundle, "preprocessing", None) or {}),
        stages=[StageRecord(**s) for s in getattr(bundle, "metadata", {}).get("stages", [])],
        extra={**bundle_source_info(bundle), "importer": "tvm.relax.frontend.torch.from_exported_program"},
    )

    def check_fn(folder: Path, lib_path: Path) -> dict[str, Any]:
        return _verify_against_torch(folder, lib_path, reference, batch, spec)

    return _compile_and_write(mod, params, src, None, target, dest, budget=budget, database_dir=database_dir,
                              batch=batch, inputs=spec.inputs, precision="fp32", verify=verify,
                              use_database=use_database, check_fn=check_fn, t0=t0, measure=device,
                              builds=builds, progress=progress)  # fmt: skip


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


def _verify_against_torch(folder: Path, lib_path: Path, reference: Any, batch: int, spec: ModelSpec) -> dict[str, Any]:
    from edgecompress.export.torch_io import run_module

    feeds = spec.example_feeds(4 * batch)
    refs = [run_module(reference, {k: v[i : i + batch] for k, v in feeds.items()}, spec) for i in range(0, 4 * batch, batch)]
    ref = [np.concatenate([r[k] for r in refs]) for k in range(len(refs[0]))]
    out = run_local(lib_path, folder / tc.PARAMS_FILE, feeds, batch, spec)
    check: dict[str, Any] = {**compare_all_outputs(ref, out), "reference": "torch (torch.export program)"}
    if check["sqnr_db"] < MIN_SQNR_DB["fp32"]:
        raise CompiledOutputError(
            f"TVM output differs from torch: SQNR {check['sqnr_db']:.1f} dB < {MIN_SQNR_DB['fp32']} dB "
            f"(max abs error {check['max_abs_error']:.3g}) for this torch.export program"
        )
    return check


def _static_inputs(spec: ModelSpec, batch: int) -> ModelSpec:
    """``spec`` with the compiled batch in every input's shape (a TVM library has a static batch)."""
    return ModelSpec([TensorSpec(name=i.name, shape=[batch, *i.shape[1:]], dtype=i.dtype, range=i.range)
                      for i in spec.inputs], list(spec.outputs))  # fmt: skip


def _verify_against_onnxruntime(
    folder: Path, lib_path: Path, onnx_artifact: Artifact, batch: int, spec: ModelSpec, precision: str,
    min_sqnr: float | None = None,
) -> dict[str, Any]:
    from edgecompress.export.onnx_export import onnx_outputs

    feeds = spec.example_feeds(4 * batch)
    ref = onnx_outputs(onnx_artifact.model_path, feeds)
    out = run_local(lib_path, folder / tc.PARAMS_FILE, feeds, batch, spec)
    check: dict[str, Any] = {**compare_all_outputs(ref, out), "reference": "onnxruntime"}
    threshold = MIN_SQNR_DB[precision] if min_sqnr is None else min_sqnr
    if check["sqnr_db"] < threshold:
        raise CompiledOutputError(
            f"TVM output differs from onnxruntime: SQNR {check['sqnr_db']:.1f} dB < {threshold} dB "
            f"(max abs error {check['max_abs_error']:.3g}) for this {precision} model"
        )
    return check


def run_local(lib_path: Path, params_path: Path, x: np.ndarray | dict[str, np.ndarray], batch: int,
              spec: ModelSpec | None = None) -> list[np.ndarray]:  # fmt: skip
    """Every output of a host library on ``x`` (feeds, or one array) in chunks of the compiled ``batch``
    (for verification)."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from edgecompress.export.spec import as_feeds, numpy_dtype

    specs = spec.inputs if spec is not None else [TensorSpec(name="input", shape=[batch])]
    feeds = as_feeds(x, [i.name for i in specs])
    dev = tvm.cpu()
    vm = VirtualMachine(tvm.runtime.load_module(str(lib_path)), dev)
    params = [tvm.runtime.tensor(p.numpy(), dev) for p in tc.load_params(params_path)]
    parts: list[list[np.ndarray]] = []
    for start in range(0, len(feeds[specs[0].name]), batch):  # verification feeds are whole batches
        args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[i.name][start : start + batch], dtype=numpy_dtype(i.dtype)),
                                   dev) for i in specs]  # fmt: skip
        out = vm["main"](*args, *params)
        parts.append([o.numpy() for o in ([out] if hasattr(out, "numpy") else list(out))])
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def _manifest(
    m: Manifest, parent_hash: str | None, target: Any, lib_path: Path, plan: tc.LibraryPlan, device: str, precision: str, batch: int,
    inputs: list[TensorSpec], tuning: dict[str, Any], notes: list[str], check: dict[str, Any], seconds: float,
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
        inputs=inputs,
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
    ``database_dir``, ``batch``, ``opset``, ``verify``, ``use_database``, ``int8_kernels`` (QDQ graphs
    on integer kernels, default True; ignored for ``torch.export`` programs), ``device`` (a
    :class:`~edgecompress.export.tvm.workers.CandidateRunner` that times tuning candidates), ``builds`` (compiles
    them elsewhere, e.g. on a Ray cluster), ``exporters`` (the custom ONNX exporters a bundle's
    modules need, see :func:`export.onnx_export.export_onnx`).
    """
    valid = ("tune", "trials_per_task", "database_dir", "batch", "verify", "use_database", "device", "builds", "progress",
             "int8_kernels")  # fmt: skip
    opts = {k: v for k, v in options.items() if k in valid and v is not None}
    unknown = set(options) - {*valid, "opset", "exporters"}
    if unknown:
        raise ExportError(f"unknown TVM export options {sorted(unknown)}; valid: {', '.join(sorted({*valid, 'opset'}))}")
    require_tuning_device(target, opts.get("tune"), opts.get("device"))  # before any exporting: fail fast
    if isinstance(source, Artifact):
        return export_tvm_from_onnx(source, target, out, **opts)
    if not hasattr(source, "module"):
        raise ExportError(f"cannot export a {type(source).__name__} to TVM; give a checkpoint bundle or an ONNX artifact")
    if getattr(source, "exported_program", None) is not None:
        prog_opts = {k: v for k, v in opts.items() if k not in ("batch", "int8_kernels")}
        return export_tvm_from_program(source, target, out, batch=opts.get("batch"), **prog_opts)
    from edgecompress.export.onnx_export import export_bundle_onnx

    with tempfile.TemporaryDirectory(prefix="edgecompress-tvm-") as tmp:
        onnx_art = export_bundle_onnx(source, Path(tmp) / "onnx", target=target, opset=options.get("opset"),
                                      exporters=options.get("exporters", ()))  # fmt: skip
        return export_tvm_from_onnx(onnx_art, target, out, **opts)

