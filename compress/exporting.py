"""Exporting models to artifacts by format name (the layer the CLI and recipes call).

Formats are listed in :mod:`edgecompress.compress.registry` (``onnx``, ``ort``, ``tvm``). An
``.onnx`` file given instead of a checkpoint becomes an ONNX artifact as is (checked and
shape-inferred). A torch model is exported with the techniques' custom ONNX exporters (QDQ,
codebooks, verified N:M), whichever format it goes to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgecompress.compress import registry
from edgecompress.compress.checkpoint import ModelBundle
from edgecompress.compress.errors import ConfigError, UnsupportedError
from edgecompress.export import Artifact, StageRecord, TensorSpec, sha256_file, write_onnx_artifact
from edgecompress.export.onnx_export import bundle_source_info as source_info  # noqa: F401  (used by the techniques)
from edgecompress.export.onnx_export import export_bundle_onnx


def export_formats() -> list[str]:
    return sorted(registry.EXPORT_FORMATS)


def export_torch_onnx(bundle: ModelBundle, out: str | Path, *, target: Any = None, opset: int | None = None,
                      **record: Any) -> Artifact:  # fmt: skip
    """A torch model to a verified ONNX artifact, with every technique's custom exporter available;
    ``record``: ``stages``, ``extra``, ``verify_inputs`` (see ``export.onnx_export.export_bundle_onnx``)."""
    return export_bundle_onnx(bundle, out, target=target, opset=opset, exporters=registry.onnx_exporters(), **record)


def export_onnx_format(source: ModelBundle | Artifact, target: Any, out: Path, **options: Any) -> Artifact:
    if isinstance(source, Artifact):
        if not source.manifest.format.startswith("onnx"):
            raise UnsupportedError(f"cannot turn a {source.manifest.format!r} artifact into ONNX")
        import onnx

        return write_onnx_artifact(
            onnx.load(str(source.model_path)), out, fmt=source.manifest.format, model_name=source.manifest.model_name,
            target=target, inputs=source.manifest.inputs, preprocessing=source.manifest.preprocessing,
            stages=source.manifest.stages, parent_hash=source.hash, metrics=dict(source.manifest.metrics),
            extra=dict(source.manifest.extra),
        )  # fmt: skip
    return export_torch_onnx(source, out, target=target, opset=options.get("opset"))


def import_onnx_file(
    path: str | Path, out: str | Path, *, target: Any = None, inputs: list[TensorSpec] | None = None
) -> Artifact:
    """Make an artifact from a user's ``.onnx`` file (checked, shapes inferred).

    The file brings its own named inputs and outputs; ``inputs`` (``--input NAME:SHAPE``) fixes
    dynamic non-batch dims (e.g. H and W) for what needs static shapes (TVM, calibration) and is
    recorded in the manifest; the graph itself is unchanged.

    Raises:
        ArtifactError: the file does not exist.
        ConfigError: the file is not a valid ONNX model.
        SpecError: an ``--input`` names no input of the model or has the wrong number of dims.
    """
    import onnx

    p = Path(path)
    if not p.is_file():
        from edgecompress.export import ArtifactError

        raise ArtifactError(f"ONNX file {str(p)!r} does not exist")
    try:
        model = onnx.load(str(p))
        onnx.checker.check_model(model)
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # protobuf DecodeError, ValidationError, OSError: all mean a bad file
        raise ConfigError(f"{p} is not a valid ONNX model: {str(exc).splitlines()[0][:200]}") from None
    from edgecompress.export.spec import ModelSpec

    spec = ModelSpec.from_onnx(model).with_overrides(inputs or [])
    return write_onnx_artifact(
        model, out, fmt="onnx", model_name=p.stem, target=target, inputs=spec.inputs,
        stages=[StageRecord(stage="import-onnx", config={"source": str(p.resolve())})],
        extra={"source_onnx": str(p.resolve()), "source_sha256": sha256_file(p)},
    )  # fmt: skip


def export_model(source: ModelBundle | Artifact, fmt: str, target: Any, out: str | Path, **options: Any) -> Artifact:
    """Export ``source`` (a loaded checkpoint or an ONNX artifact) to ``fmt`` for ``target``.

    Raises:
        ConfigError: unknown format (lists the known ones).
    """
    export = registry.export_format(fmt)
    if export is None:
        raise ConfigError(f"unknown export format {fmt!r}; known: {', '.join(export_formats())}")
    options = _with_tuning_device(fmt, target, _with_build_cluster(fmt, options))
    if fmt != "onnx" and isinstance(source, ModelBundle):
        options["exporters"] = registry.onnx_exporters()
    builds = options.get("builds")
    try:
        return export(source, target, Path(out), **options)
    finally:
        if builds is not None:
            builds.close()


def _with_build_cluster(fmt: str, options: dict[str, Any]) -> dict[str, Any]:
    """Turn ``executor: ray`` (and ``ray_address``) into the Ray builds of TVM tuning candidates.

    Raises:
        ConfigError: an unknown executor, or ray for a format that does not tune or without a budget.
        MissingExtraError, ClusterError: Ray is not installed or the cluster does not answer (exit 3).
    """
    executor, address = options.get("executor"), options.get("ray_address")
    rest = {k: v for k, v in options.items() if k not in ("executor", "ray_address")}
    if executor in (None, "local") and address is None:
        return rest
    if executor not in ("ray", None):
        raise ConfigError(f"unknown executor {executor!r}; valid: local, ray")
    if executor is None:
        raise ConfigError("--ray-address names a Ray cluster: add --executor ray")
    if fmt != "tvm" or rest.get("tune") is None:
        raise ConfigError("--executor ray builds TVM tuning candidates on a Ray cluster: use it with --format tvm --tune")
    from edgecompress.compress.cluster import RayBuilds

    return {**rest, "builds": RayBuilds(address)}


DEVICE_OPTIONS = ("rpc", "tracker", "key", "timeout")


def _with_tuning_device(fmt: str, target: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Turn ``rpc``/``tracker``/``key``/``timeout`` options into the device that times tuning candidates.

    The device is connected here, before anything is compiled, so a dead server, a wrong key or
    an emulator fails in seconds.

    Raises:
        ConfigError: device options for a format other than ``tvm``, without ``tune``, or a key
            without an address.
        DeviceConnectionError: the device cannot be reached, refuses the key, or is an emulator.
    """
    given = {k: options[k] for k in DEVICE_OPTIONS if options.get(k) is not None}
    rest = {k: v for k, v in options.items() if k not in DEVICE_OPTIONS}
    if not given:
        return rest
    if fmt != "tvm":
        raise ConfigError(f"{', '.join(sorted(given))} name a device for TVM tuning; format {fmt!r} does not tune")
    if not given.get("rpc") and not given.get("tracker"):
        raise ConfigError(f"{', '.join(sorted(given))} given without a device address: add rpc HOST:PORT or tracker HOST:PORT")
    if given.get("rpc") and given.get("tracker"):
        raise ConfigError("give either rpc (one device server) or tracker (a TVM tracker of devices), not both")
    if rest.get("tune") is None:
        raise ConfigError("a device (rpc/tracker) is used to time tuning candidates: add a tuning budget (--tune 10m)")
    from edgecompress.runtimes.tvm_tuning import open_tuning_device

    device = open_tuning_device(target, rpc=given.get("rpc"), tracker=given.get("tracker"), key=given.get("key"),
                                 timeout=float(given.get("timeout", 60.0)))  # fmt: skip
    return {**rest, "device": device}
