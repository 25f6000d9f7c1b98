"""onnxruntime's mobile format (``.ort``) with the XNNPACK provider settings, for phones and boards.

The artifact folder holds ``model.ort`` (converted by onnxruntime's own converter,
``onnxruntime.tools.convert_onnx_models_to_ort``), ``required_operators.config`` (the operator list
a reduced onnxruntime build for the device needs) and ``manifest.json`` with format ``ort``.
``extra["ort_session"]`` records how the device should open the model: the execution providers,
their options (XNNPACK's thread pool sized by the target's ``num_threads``) and the session
config entries. On ARM targets the model is converted with the *Runtime* optimization style
(XNNPACK is a compiling provider: the optimizations the CPU provider would bake in are saved and
replayed only for the nodes XNNPACK does not take). The ``.ort`` file is loaded with onnxruntime
on this machine and its outputs compared with the source ONNX model before the artifact is written.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.export.artifact import (
    Artifact,
    Manifest,
    StageRecord,
    artifact_writer,
    load_artifact,
    write_manifest,
)
from edgecompress.export.errors import ExportError
from edgecompress.export.ort_session import ort_session
from edgecompress.export.verify import compare_outputs

FORMAT = "ort"
MODEL_FILE = "model.ort"
CONFIG_FILE = "required_operators.config"
XNNPACK = "XnnpackExecutionProvider"
# The .ort model runs the same kernels as the ONNX model on this machine: anything below this is a
# broken conversion, not rounding.
MIN_SQNR_DB = 60.0


def _is_arm(target: Any) -> bool:
    if target is None:
        return False
    spec = dict(getattr(target, "tvm_host", None) or getattr(target, "tvm", None) or {})
    return str(spec.get("mtriple", "")).startswith("aarch64") or str(getattr(target, "name", "")).startswith("arm64")


def session_settings(target: Any) -> dict[str, Any]:
    """How the device opens the ``.ort`` model: providers, provider options, session options.

    For ARM targets XNNPACK leads, with its own thread pool of ``target.num_threads`` threads, and
    onnxruntime's intra-op pool is one thread without spinning (onnxruntime's advice for XNNPACK:
    two busy pools fight over the cores). Other targets keep their providers and thread count.
    """
    threads = int(getattr(target, "num_threads", 0) or 0)
    providers = [str(p) for p in (getattr(target, "ort_providers", None) or ("CPUExecutionProvider",))]
    config: dict[str, str] = {}
    provider_options: dict[str, dict[str, str]] = {}
    intra = threads
    if _is_arm(target):
        if XNNPACK not in providers:
            providers.insert(0, XNNPACK)
        provider_options[XNNPACK] = {"intra_op_num_threads": str(threads or 1)}
        intra = 1
        config["session.intra_op.allow_spinning"] = "0"
        config["session.enable_saved_runtime_optimizations"] = "1"
    if "CPUExecutionProvider" not in providers:
        providers.append("CPUExecutionProvider")
    return {
        "providers": providers,
        "provider_options": provider_options,
        "intra_op_num_threads": intra,
        "inter_op_num_threads": 1,
        "session_config": config,
    }


def convert_to_ort(onnx_path: Path, out_dir: Path, *, runtime_optimizations: bool, arm: bool) -> tuple[Path, Path]:
    """Convert one ONNX file with onnxruntime's converter; returns (``.ort`` file, operator config).

    Raises:
        ExportError: onnxruntime cannot convert the model (the message says why).
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    style = OptimizationStyle.Runtime if runtime_optimizations else OptimizationStyle.Fixed
    with tempfile.TemporaryDirectory(prefix="edgecompress-ort-") as tmp:
        src = Path(tmp) / "model.onnx"
        shutil.copyfile(onnx_path, src)
        conv = Path(tmp) / "out"
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):  # the converter prints its progress
                convert_onnx_models_to_ort(src, output_dir=conv, optimization_styles=[style],
                                           target_platform="arm" if arm else "amd64")  # fmt: skip
        except Exception as exc:  # onnxruntime raises its own exception classes
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
            raise ExportError(f"onnxruntime cannot convert {onnx_path.name} to the .ort format: {detail}") from None
        models = sorted(conv.glob("*.ort"))
        configs = sorted(conv.glob("*.config"))
        if not models:
            raise ExportError(f"onnxruntime's converter wrote no .ort file: {buf.getvalue()[-300:]}")
        out_dir.mkdir(parents=True, exist_ok=True)
        model = out_dir / MODEL_FILE
        shutil.copyfile(models[0], model)
        config = out_dir / CONFIG_FILE
        if configs:
            shutil.copyfile(configs[0], config)
        return model, config


def open_session(model_path: Path, settings: dict[str, Any]) -> Any:
    """An onnxruntime session for the ``.ort`` file with ``settings`` (providers this onnxruntime
    build lacks, such as XNNPACK in the x86 wheels, are skipped)."""
    return ort_session(model_path, providers=[str(p) for p in settings["providers"]], settings=settings)


def export_ort_from_onnx(onnx_artifact: Artifact, target: Any, dest: str | Path, *, verify: bool = True) -> Artifact:
    """Convert an ONNX artifact (fp32 or QDQ) to an ``ort`` artifact for ``target``.

    Raises:
        ExportError: the source is not ONNX, the conversion failed, or the ``.ort`` model's outputs
            differ from the ONNX model's.
    """
    import onnxruntime as ort

    m = onnx_artifact.manifest
    if not m.format.startswith("onnx"):
        raise ExportError(f"the ort format converts ONNX artifacts; got format {m.format!r}")
    t0 = time.perf_counter()
    arm = _is_arm(target)
    settings = session_settings(target)
    with artifact_writer(dest) as tmp:
        model_path, _ = convert_to_ort(onnx_artifact.model_path, tmp, runtime_optimizations=arm, arm=arm)
        check: dict[str, Any] = {}
        if verify:
            check = _verify(model_path, onnx_artifact, settings)
        notes = [n for n in m.extra.get("notes", []) if isinstance(n, str)]
        if arm and XNNPACK not in ort.get_available_providers():
            notes.append(f"verified here with {', '.join(p for p in settings['providers'] if p != XNNPACK)}: "
                         "this onnxruntime has no XNNPACK provider; the device uses the recorded settings")  # fmt: skip
        extra = {
            **{k: v for k, v in m.extra.items() if k != "notes"},
            "source_format": m.format,
            "ort_session": settings,
            "optimization_style": "runtime" if arm else "fixed",
            "operator_config": CONFIG_FILE if (tmp / CONFIG_FILE).is_file() else None,
            "notes": notes,
        }
        manifest = Manifest(
            format=FORMAT,
            format_version=f"ort-onnxruntime-{ort.__version__}",
            model_name=m.model_name,
            target=target.to_dict() if target is not None else {},
            model_file=MODEL_FILE,
            inputs=m.inputs,
            outputs=m.outputs,
            preprocessing=m.preprocessing,
            stages=[*m.stages, StageRecord(stage="export-ort", config={"target": getattr(target, "name", None),
                                                                        "optimization_style": extra["optimization_style"]},
                                           seconds=round(time.perf_counter() - t0, 3))],  # fmt: skip
            parent_hash=onnx_artifact.hash,
            metrics={**({"export_check": check} if check else {}),
                     **({"source_export_check": m.metrics["export_check"]} if "export_check" in m.metrics else {})},
            extra=extra,
        )  # fmt: skip
        write_manifest(tmp, manifest)
    return load_artifact(dest)


def _verify(model_path: Path, onnx_artifact: Artifact, settings: dict[str, Any]) -> dict[str, Any]:
    spec = onnx_artifact.manifest.inputs[0] if onnx_artifact.manifest.inputs else None
    dims = [d for d in (spec.shape if spec else [])]
    sample = [int(d) for d in dims[1:] if isinstance(d, int) or str(d).isdigit()]
    if not spec or len(sample) != len(dims) - 1 or not all(s > 0 for s in sample):
        raise ExportError(f"artifact {onnx_artifact.path} does not record a static input shape; re-export it")
    batch = int(dims[0]) if isinstance(dims[0], int) and int(dims[0]) > 0 else 4
    x = np.random.default_rng(0).standard_normal((batch, *sample)).astype(np.float32)
    ref_sess = ort_session(onnx_artifact.model_path)
    ref = ref_sess.run(None, {ref_sess.get_inputs()[0].name: x})[0]
    try:
        sess = open_session(model_path, settings)
    except Exception as exc:  # onnxruntime's own exception classes
        raise ExportError(f"onnxruntime cannot load the converted .ort model: {exc}") from None
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    check: dict[str, Any] = {**compare_outputs(ref, out), "reference": "onnxruntime (source ONNX)"}
    if check["sqnr_db"] < MIN_SQNR_DB and check["max_abs_error"] > 1e-4:
        raise ExportError(f".ort model output differs from the ONNX model: SQNR {check['sqnr_db']:.1f} dB "
                          f"(max abs error {check['max_abs_error']:.3g})")  # fmt: skip
    return check


def export_ort_format(source: Any, target: Any, out: str | Path, **options: Any) -> Artifact:
    """The ``ort`` export format: a compress ``ModelBundle`` (anything with ``.module``) or an ONNX
    artifact -> an onnxruntime mobile artifact. A bundle is exported to ONNX first (verified against
    torch). Options: ``opset``, ``verify`` (``tune`` must be unset: tuning is for TVM).
    """
    if options.get("tune"):
        raise ExportError("--tune applies to the tvm format; the ort format has nothing to tune")
    unknown = set(options) - {"opset", "verify", "tune", "exporters"}
    if unknown:
        raise ExportError(f"unknown ort export options {sorted(unknown)}; valid: opset, verify")
    verify = bool(options.get("verify", True))
    if isinstance(source, Artifact):
        return export_ort_from_onnx(source, target, out, verify=verify)
    if not hasattr(source, "module"):
        raise ExportError(f"cannot export a {type(source).__name__} to ort; give a checkpoint bundle or an ONNX artifact")
    from edgecompress.export.onnx_export import export_bundle_onnx

    with tempfile.TemporaryDirectory(prefix="edgecompress-ort-") as tmp:
        onnx_art = export_bundle_onnx(source, Path(tmp) / "onnx", target=target, opset=options.get("opset"),
                                      exporters=options.get("exporters", ()))  # fmt: skip
        return export_ort_from_onnx(onnx_art, target, out, verify=verify)
