"""JLCM: jointly learnable codebooks and mappings (Yvinec, Dapogny, Bailly, ICLR 2024, arXiv 2309.17361).

Weights become packed codeword indices plus small codebooks and group scales; the ONNX export
(format ``onnx-codebook``) stores exactly that and rebuilds each weight inside the graph.

Only :mod:`compress.codebook.config` is light; the other modules import torch and are loaded on use:

- :mod:`compress.codebook.packing`: 1-6 bit indices packed in uint8, exact round trip.
- :mod:`compress.codebook.layers`: ``CodebookLinear`` / ``CodebookConv2d`` and bits-per-weight accounting.
- :mod:`compress.codebook.grouping`: neuron grouping, reordering and permutation folding.
- :mod:`compress.codebook.learn`: k-means initialisation, joint learning, proximal / STE mapping updates.
- :mod:`compress.codebook.api`: ``apply_jlcm(model, calib, config)``, the one verb.
- :mod:`compress.codebook.onnx_export`: the ``onnx-codebook`` exporter.
"""

from compress.codebook.config import JLCMConfig

__all__ = ["JLCMConfig"]
