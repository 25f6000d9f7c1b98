"""CLI options shared by the commands that take a model checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from compress.checkpoint import ModelBundle, load_checkpoint
from compress.cli.common import parse_shape

ModelFactoryOption = typer.Option(
    None,
    "--model-factory",
    help="Built-in model name or package.module:function building the model for a plain state_dict. "
    "Naming Python code here is the explicit permission to import it.",
)
TrustPickleOption = typer.Option(
    False, "--trust-pickle", help="Allow checkpoints that unpickle arbitrary objects (can run code: trusted files only)."
)
InputShapeOption = typer.Option(None, "--input-shape", help="One sample's shape without batch, e.g. 1,28,28.")


def load_model_from_cli(
    path: Path, model_factory: str | None, trust_pickle: bool, input_shape: str | None
) -> ModelBundle:
    """Load a checkpoint as the CLI options say (a factory given on the command line may be imported)."""
    return load_checkpoint(
        path,
        model_factory=model_factory,
        allow_code=model_factory is not None,
        trust_pickle=trust_pickle,
        input_shape=parse_shape(input_shape),
    )
