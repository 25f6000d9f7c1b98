"""Built-in example models (no downloads): ``create_model("cnn")``, ``list_models()``."""

from edgecompress.compress.models.registry import (
    builtin_model_spec,
    builtin_model_task,
    create_model,
    describe_model,
    list_models,
    register_model,
)

__all__ = ["builtin_model_spec", "builtin_model_task", "create_model", "describe_model", "list_models", "register_model"]
