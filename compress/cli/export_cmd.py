"""``compress export``: a checkpoint (or ONNX file) to a verified artifact for a target."""

from __future__ import annotations

from pathlib import Path

import typer

from compress.cli.common import JsonOption, cli_progress, emit_json, print_table
from compress.cli.inputs import InputShapeOption, ModelFactoryOption, TrustPickleOption, load_model_from_cli


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        model: Path = typer.Argument(..., help="Checkpoint (.pt/.pth/.safetensors/.pt2) or .onnx file."),
        fmt: str = typer.Option("onnx", "--format", "-f", help="Artifact format: onnx or tvm."),
        target: str = typer.Option("x86-64", "--target", "-t", help="Device target: see 'compress targets'."),
        out: Path = typer.Option(..., "-o", "--out", help="Artifact folder to write (replaced atomically)."),
        opset: int = typer.Option(17, help="ONNX opset (>= 17)."),
        tune: str | None = typer.Option(None, "--tune", help="TVM: MetaSchedule tuning budget, e.g. 10m or 200 (trials)."),
        model_factory: str | None = ModelFactoryOption,
        trust_pickle: bool = TrustPickleOption,
        input_shape: str | None = InputShapeOption,
        json_out: bool = JsonOption,
    ) -> None:
        """Export MODEL for a target and verify the artifact against torch."""
        from compress.checkpoint import is_onnx_file
        from compress.exporting import export_model
        from targets import get_target

        tgt = get_target(target)
        with cli_progress(not json_out):
            if is_onnx_file(model):
                from compress.exporting import onnx_file_or_checkpoint

                work = out.with_name(f".{out.name}.onnx-src")
                try:
                    art = export_model(onnx_file_or_checkpoint(model, work, target=tgt), fmt, tgt, out, opset=opset,
                                       tune=tune)  # fmt: skip
                finally:
                    import shutil

                    shutil.rmtree(work, ignore_errors=True)
            else:
                bundle = load_model_from_cli(model, model_factory, trust_pickle, input_shape)
                art = export_model(bundle, fmt, tgt, out, opset=opset, tune=tune)
        m = art.manifest
        result = {"artifact": str(art.path), "format": m.format, "target": tgt.name, "size_bytes": art.size_bytes,
                  "files": m.files, "metrics": m.metrics, "notes": m.extra.get("notes", [])}  # fmt: skip
        if json_out:
            emit_json(result)
            return
        check = m.metrics.get("export_check", {})
        print_table(
            f"exported {m.model_name} -> {art.path}",
            ["format", "target", "size (bytes)", "SQNR vs torch (dB)", "max abs error"],
            [[m.format, tgt.name, art.size_bytes, check.get("sqnr_db"), check.get("max_abs_error")]],
        )
        for note in m.extra.get("notes", []):
            typer.echo(f"note: {note}")
