"""edgecompress: compress PyTorch models and export them to edge devices, from Python.

One verb per job, the same functions the ``compress`` command and the recipe stages call::

    import edgecompress as ec

    sparse = ec.sparsify(model, pattern="2:4", method="mdgf", data=(x_train, y_train))
    art = ec.export(sparse.model, format="onnx", target="x86-64", workdir="art/")
    report = ec.check(art.artifact, data=(x_test, y_test), reference=model)

Verbs: :func:`sparsify`, :func:`qat`, :func:`codebook`, :func:`quantize`, :func:`export`,
:func:`check`, :func:`profile` and :func:`run` (a recipe). Each takes a model (an ``nn.Module``, a
checkpoint path or an artifact), a config object or keyword options, and data, and returns a
typed :class:`~edgecompress.compress.api.Result`. Importing this package loads no heavy library
(torch, onnxruntime and TVM are imported when a verb runs).

The library's layers are sub-packages: ``edgecompress.targets`` (devices as data),
``edgecompress.export`` (artifacts), ``edgecompress.runtimes`` (running them) and
``edgecompress.compress`` (the techniques, recipes and the CLI). Reach the export layer with
``from edgecompress.export import ...``: the attribute ``edgecompress.export`` is the verb.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

# A source checkout run without installing it (a device machine given the code as committed): the
# sub-packages are the folders beside this one. Installed, they are inside it (setuptools package-dir).
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "export" / "__init__.py").is_file():
    __path__.append(str(_checkout))

from edgecompress.compress.api import (  # noqa: E402  (after the checkout path above)
    Data,
    Result,
    check,
    codebook,
    export,
    profile,
    qat,
    quantize,
    run,
    sparsify,
)

__version__ = "0.1.0"

VERBS = ("sparsify", "qat", "codebook", "quantize", "export", "check", "profile", "run")

__all__ = ["VERBS", "Data", "Result", "__version__", "check", "codebook", "export", "profile", "qat", "quantize", "run",
           "sparsify"]


class _Namespace(types.ModuleType):
    """The package module: a verb keeps its name when the sub-package of the same name is imported
    (``import edgecompress.export`` would otherwise rebind ``edgecompress.export`` to the package)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in VERBS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Namespace
