"""edgecompress: compress PyTorch models and export them to edge devices.

The library is organised as the ``compress`` command is: checkpoints and data
(:mod:`edgecompress.compress.checkpoint`, :mod:`edgecompress.compress.data`), the techniques (``compress.sparsity``,
``compress.qat``, ``compress.codebook``, ``compress.ptq``), recipes (:mod:`edgecompress.compress.recipe`,
:mod:`edgecompress.compress.pipeline`) and the CLI (:mod:`edgecompress.compress.cli`). Importing it loads no heavy library.
"""

__version__ = "0.1.0"
