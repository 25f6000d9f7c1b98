"""JLCM: jointly learnable codebooks and mappings (Yvinec, Dapogny, Bailly, ICLR 2024, arXiv 2309.17361).

Weights become packed codeword indices plus small codebooks and group scales; the ONNX export
(format ``onnx-codebook``) stores exactly that and rebuilds each weight inside the graph.

Only :mod:`edgecompress.compress.codebook.config` is light; the other modules import torch and are loaded on use:

- :mod:`edgecompress.compress.codebook.packing`: 1-6 bit indices packed in uint8, exact round trip.
- :mod:`edgecompress.compress.codebook.layers`: ``CodebookLinear`` / ``CodebookConv2d`` and bits-per-weight accounting.
- :mod:`edgecompress.compress.codebook.grouping`: neuron grouping, reordering and permutation folding.
- :mod:`edgecompress.compress.codebook.learn`: k-means initialisation, joint learning, proximal / STE mapping updates.
- :mod:`edgecompress.compress.codebook.api`: ``apply_jlcm(model, calib, config)``, the one verb.
- :mod:`edgecompress.compress.codebook.onnx_export`: the ``onnx-codebook`` exporter.
"""

from edgecompress.compress.codebook.config import JLCMConfig

__all__ = ["JLCMConfig"]
