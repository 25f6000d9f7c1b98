"""``compress export``: a checkpoint (or ONNX file) to a verified artifact for a target."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from edgecompress.compress.cli.common import (
    ExecutorOption,
    JsonOption,
    RayAddressOption,
    cli_progress,
    emit_json,
    print_table,
)
from edgecompress.compress.cli.inputs import (
    AllowFailedOption,
    InputOption,
    InputShapeOption,
    ModelFactoryOption,
    TrustPickleOption,
    model_options,
)


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        model: Path = typer.Argument(..., help="Checkpoint (.pt/.pth/.safetensors/.pt2) or .onnx file."),
        fmt: str = typer.Option("onnx", "--format", "-f", help="Artifact format: onnx or tvm."),
        target: str = typer.Option("x86-64", "--target", "-t", help="Device target: see 'compress targets'."),
        out: Path = typer.Option(..., "-o", "--out", help="Artifact folder to write (replaced atomically)."),
        opset: int = typer.Option(17, help="ONNX opset (>= 17)."),
        tune: str | None = typer.Option(None, "--tune", help="TVM: MetaSchedule tuning budget, e.g. 10m or 200 (trials)."),
        rpc: str | None = typer.Option(
            None, "--rpc", help="TVM tuning: time candidates on the device server at HOST:PORT (required for ARM64/GPU)."
        ),
        tracker: str | None = typer.Option(None, "--tracker", help="TVM tuning: get a device from the tracker at HOST:PORT."),
        key: str | None = typer.Option(None, "--key", help="Device key (the server's --key, or the tracker's device key)."),
        timeout: float = typer.Option(60.0, "--timeout", min=1.0, help="Seconds one remote step may take while tuning."),
        no_tuned_records: bool = typer.Option(
            False, "--no-tuned-records", help="TVM: build without any tuning record (untuned, slow, always as TVM computes it)."
        ),
        no_int8_kernels: bool = typer.Option(
            False, "--no-int8-kernels", help="TVM: compute a QDQ int8 graph's convs/matmuls in float as written, not on 8-bit integers."
        ),
        executor: str | None = ExecutorOption,
        ray_address: str | None = RayAddressOption,
        model_factory: str | None = ModelFactoryOption,
        trust_pickle: bool = TrustPickleOption,
        input_shape: str | None = InputShapeOption,
        inputs: list[str] | None = InputOption,
        allow_failed: bool = AllowFailedOption,
        json_out: bool = JsonOption,
    ) -> None:
        """Export MODEL for a target and verify the artifact against torch.

        TVM artifacts for ARM64 and GPU targets are tuned on the device: --tune 10m --rpc HOST:PORT --key K.
        """
        from edgecompress.compress.api import export

        int8_options: dict[str, Any] = {"int8_kernels": False} if no_int8_kernels and fmt == "tvm" else {}
        with cli_progress(not json_out):
            res = export(model, format=fmt, target=target, workdir=out, opset=opset, tune=tune, rpc=rpc, tracker=tracker,
                         key=key, timeout=timeout, use_tuned_records=not no_tuned_records, executor=executor,
                         ray_address=ray_address, allow_failed=allow_failed,
                         progress=lambda line: typer.echo(line, err=True),
                         **int8_options,
                         **model_options(model_factory, trust_pickle, input_shape, inputs))  # fmt: skip
        art, result = res.artifact, res.summary
        m = art.manifest
        if json_out:
            emit_json(result)
            return
        check = m.metrics.get("export_check", {})
        print_table(
            f"exported {m.model_name} -> {art.path}",
            ["format", "target", "size (bytes)", "SQNR vs torch (dB)", "max abs error"],
            [[m.format, result["target"], art.size_bytes, check.get("sqnr_db"), check.get("max_abs_error")]],
        )
        tuning = m.extra.get("tuning")
        if tuning:
            typer.echo(f"tuning: {tuning['trials']} trials measured on {tuning.get('measured_on', 'this machine')} in {tuning['seconds']} s; "
                       f"{tuning['tasks_tuned']} tasks tuned, {tuning['tasks_from_database']} from the database, "
                       f"{tuning['tasks_left']} left (database {tuning['database']})")  # fmt: skip
        for note in m.extra.get("notes", []):
            typer.echo(f"note: {note}")
