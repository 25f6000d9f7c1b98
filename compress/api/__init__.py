"""The Python API: one verb per job, over the same functions the ``compress`` command and the recipe
stages call. Import it as ``import edgecompress as ec``; nothing heavy is imported until a verb runs.

Each verb is keyword-only after the model: ``verb(model, config=None, *, data=..., target=...,
workdir=..., **options) -> Result``. See :mod:`edgecompress` for an example.
"""

from edgecompress.compress.api.deploy import check, export, profile
from edgecompress.compress.api.learned import codebook, qat
from edgecompress.compress.api.recipes import run
from edgecompress.compress.api.result import Data, Result
from edgecompress.compress.api.techniques import quantize, sparsify

__all__ = ["Data", "Result", "check", "codebook", "export", "profile", "qat", "quantize", "run", "sparsify"]
