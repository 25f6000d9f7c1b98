"""Built-in example models (no downloads): ``create_model("cnn")``, ``list_models()``."""

from compress.models.registry import create_model, describe_model, list_models, register_model

__all__ = ["create_model", "describe_model", "list_models", "register_model"]
