"""CLI options shared by the commands that take a model checkpoint."""

from __future__ import annotations

from typing import Any

import typer

from edgecompress.compress.cli.common import parse_shape

ModelFactoryOption = typer.Option(
    None,
    "--model-factory",
    help="Built-in model name or package.module:function building the model for a plain state_dict. "
    "Naming Python code here is the explicit permission to import it.",
)
TrustPickleOption = typer.Option(
    False, "--trust-pickle", help="Allow checkpoints that unpickle arbitrary objects (can run code: trusted files only)."
)
InputShapeOption = typer.Option(
    None, "--input-shape", help="Shorthand for one float input: one sample's shape without batch, e.g. 3,224,224."
)
InputOption = typer.Option(
    None,
    "--input",
    help="A model input NAME:SHAPE[:DTYPE], shape without batch with x between dims (repeatable, in forward "
    "order): --input input_ids:32:int64 --input attention_mask:32:int64. Fixes dynamic dims of ONNX inputs.",
)
DataOption = typer.Option(
    None, "--data", "-d", help="Built-in dataset name, .npz file (one array per input, optional y) or image folder; "
    "split into train/calib/val/test."
)
CalibDataOption = typer.Option(None, "--calib-data", help="Data used whole for calibration (and training without --data).")
EvalDataOption = typer.Option(None, "--eval-data", help="Data used whole for evaluation (validation and test numbers).")
MetricOption = typer.Option(
    None, "--metric", help="top1 (labels), agreement (top-1 agreement with fp32), cosine or sqnr (vs fp32 outputs); "
    "default: top1 with labels, else agreement for logits, else cosine."
)

MaxDropOption = typer.Option(
    None, "--max-drop", help="Accuracy guard: most points of the metric the result may lose against fp32 on its "
    "runtime (default: the target's budget, 1 point); more exits 4 with the worst layers.",
)
MinSqnrOption = typer.Option(None, "--min-sqnr", help="Accuracy guard with --metric sqnr: the lowest output SQNR "
                             "(dB) against fp32 (default 20).")  # fmt: skip
AllowFailedOption = typer.Option(False, "--allow-failed", help="Take an input whose accuracy guard failed.")


def model_options(model_factory: str | None, trust_pickle: bool, input_shape: str | None,
                  inputs: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """The loading keywords of a verb from the CLI's options (a factory given on the command line
    may be imported: naming it is the permission)."""
    return {"model_factory": model_factory, "trust_pickle": trust_pickle, "input_shape": parse_shape(input_shape),
            "inputs": inputs or None}  # fmt: skip
