"""edgecompress: compress PyTorch models and export them to edge devices.

The library is organised as the ``compress`` command is: checkpoints and data
(:mod:`compress.checkpoint`, :mod:`compress.data`), the techniques (``compress.sparsity``,
``compress.qat``, ``compress.codebook``, ``compress.ptq``), recipes (:mod:`compress.recipe`,
:mod:`compress.pipeline`) and the CLI (:mod:`compress.cli`). Importing it loads no heavy library.
"""

__version__ = "0.1.0"
