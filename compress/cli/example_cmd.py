"""``compress example``: train the built-in example models on built-in real data."""

from __future__ import annotations

from pathlib import Path

import typer

from edgecompress.compress.cli.common import JsonOption, cli_progress, emit_json, print_table, say


def register(app: typer.Typer) -> None:
    example = typer.Typer(help="Built-in example models trained on built-in MNIST (no downloads).", no_args_is_help=True)
    app.add_typer(example, name="example")

    @example.command("train")
    def train(
        name: str = typer.Argument(..., help="Built-in model: see 'compress list models'."),
        out: Path = typer.Option(..., "-o", "--out", help="Folder for <name>.pt."),
        steps: int | None = typer.Option(None, help="Training steps (default: the model's tuned value)."),
        seed: int = typer.Option(0, help="Random seed."),
        data: str = typer.Option("mnist", help="Built-in dataset to train on."),
        json_out: bool = JsonOption,
    ) -> None:
        """Train a built-in example model and write its checkpoint with metadata."""
        import torch

        from edgecompress.compress.checkpoint import load_checkpoint
        from edgecompress.compress.examples import train_example
        from edgecompress.compress.models import list_models

        if name not in list_models():
            from edgecompress.compress.errors import ConfigError

            raise ConfigError(f"unknown example model {name!r}; known: {', '.join(list_models())}")
        with cli_progress(not json_out):
            path = train_example(name, out, steps=steps, seed=seed, data=data)
        meta = load_checkpoint(path).metadata
        result = {"checkpoint": str(path), "model": name, **meta,
                  "parameters": sum(p.numel() for p in torch.load(path, weights_only=True)["state_dict"].values())}  # fmt: skip
        if json_out:
            emit_json(result)
        elif "test_accuracy" in meta:
            print_table(f"example {name}", ["checkpoint", "test accuracy %", "val accuracy %", "steps", "seconds"],
                        [[path, meta["test_accuracy"], meta["val_accuracy"], meta["steps"], meta["train_seconds"]]])  # fmt: skip
        else:
            say(f"example {name}: {path} ({result['parameters']:,} parameters; {meta.get('pretrained') or meta.get('trained_on')})")

    @example.command("list")
    def list_examples(json_out: bool = JsonOption) -> None:
        """List the built-in example models."""
        from edgecompress.compress.models import describe_model, list_models

        rows = [[n, describe_model(n)] for n in list_models()]
        if json_out:
            emit_json({"models": [{"name": n, "description": d} for n, d in rows]})
        else:
            print_table("built-in example models", ["name", "description"], rows)
            say("train one with: compress example train NAME -o ex/")
