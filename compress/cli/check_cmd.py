"""``compress check``: accuracy of an artifact on its runtime against the torch reference."""

from __future__ import annotations

from pathlib import Path

import typer

from compress.cli.common import JsonOption, emit_json, print_table, say
from compress.cli.inputs import EvalDataOption, MetricOption


def register(app: typer.Typer) -> None:
    @app.command("check")
    def check_cmd(
        artifact: Path = typer.Argument(..., help="Artifact folder (from 'compress export')."),
        data: str | None = typer.Option(
            None, "--data", "-d", help="Built-in dataset name, .npz file or image folder (its --split is scored)."
        ),
        eval_data: str | None = EvalDataOption,
        split: str = typer.Option("test", help="Split of --data to evaluate: train, calib, val or test."),
        metric: str | None = MetricOption,
        reference: Path | None = typer.Option(None, help="fp32 checkpoint to compare with (default: the export source)."),
        model_factory: str | None = typer.Option(None, "--model-factory", help="Factory for a plain state_dict reference."),
        target: str | None = typer.Option(None, "--target", "-t", help="Target (default: the artifact's)."),
        threads: int | None = typer.Option(None, help="Runtime threads (default: the target's)."),
        max_accuracy_drop: float | None = typer.Option(None, help="Fail (exit 4) when accuracy drops more (points)."),
        rpc: str | None = typer.Option(None, "--rpc", help="Also run on a TVM RPC device host:port (TVM artifacts)."),
        key: str | None = typer.Option(None, "--key", help="RPC key of the device."),
        json_out: bool = JsonOption,
    ) -> None:
        """Check ARTIFACT's accuracy on DATA with its runtime, next to torch (agreement, cosine, SQNR)."""
        from compress.data import image_shape, load_dataset, load_splits
        from compress.errors import ConfigError, GateFailure
        from compress.evaluation import check_artifact, reference_model
        from export import load_artifact
        from runtimes.measure import METRIC_UNITS
        from targets import get_target

        art = load_artifact(artifact)
        tgt = get_target(target) if target else (get_target(art.manifest.target["name"]) if art.manifest.target else None)
        if (data is None) == (eval_data is None):
            raise ConfigError("give the evaluation data as --data D (its --split is scored) or --eval-data F (used whole)")
        pre = art.manifest.preprocessing or None
        size = image_shape(art.manifest.inputs)
        if eval_data is not None:
            ds = load_dataset(eval_data, preprocessing=pre, input_shape=size)
        else:
            ds = load_splits(str(data), preprocessing=pre, input_shape=size)[split]
        ref = reference_model(art, checkpoint=reference, model_factory=model_factory, allow_code=model_factory is not None)
        sessions = []
        if rpc:
            from runtimes.tvm_rpc import remote_session  # provided by the TVM backend

            sessions.append(remote_session(art, rpc, key=key, target=tgt))
        result = check_artifact(art, ds, target=tgt, reference=ref, sessions=sessions, threads=threads, metric=metric)
        if rpc:
            from runtimes.tvm_rpc import emulation_note

            note = emulation_note(sessions[0].where, tgt)
            if note:
                result["notes"] = [*result.get("notes", []), note]
        if max_accuracy_drop is not None and result.get("accuracy_drop") is None:
            raise ConfigError(
                f"--max-accuracy-drop needs a metric with a drop vs fp32 (top1, agreement, cosine); "
                f"this check scored {result['metric']}"
            )
        failed = max_accuracy_drop is not None and result["accuracy_drop"] > max_accuracy_drop
        if json_out:
            emit_json({**result, "passed": not failed})
        else:
            print_table(
                f"{result['metric']} on {ds.name} ({len(ds)} samples, all used)",
                ["runtime", "where", f"{result['metric']} ({METRIC_UNITS[result['metric']]})", "top-1 %",
                 "agreement vs fp32 %", "cosine vs fp32", "SQNR vs fp32 (dB)", "max abs err"],
                [[r["runtime"], r["where"], r["score"], r.get("accuracy"), r.get("top1_agreement"), r.get("cosine"),
                  r.get("sqnr_db"), r.get("max_abs_error")] for r in result["rows"]],
            )  # fmt: skip
            for c in result.get("cross_runtime", []):
                say(f"{c['a']} vs {c['b']}: agreement {c.get('top1_agreement', 0):.2f}%, SQNR {c['sqnr_db']:.1f} dB")
            if len(result["rows"]) == 1 or not result["rows"][0]["runtime"].endswith("(reference)"):
                say("no fp32 reference (pass --reference CKPT to compare against the fp32 model)")
            for note in result.get("notes", []):
                say(f"note: {note}")
        if failed:
            raise GateFailure(
                f"accuracy dropped {result['accuracy_drop']:.2f} points > {max_accuracy_drop}",
                [{"target": tgt.name if tgt else "-", "gate": "max_accuracy_drop", "limit": max_accuracy_drop,
                  "value": result["accuracy_drop"], "excess": result["accuracy_drop"] - max_accuracy_drop}],
            )  # fmt: skip
