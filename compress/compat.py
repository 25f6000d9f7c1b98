"""Which stage orders and targets can work together, checked before anything runs.

The rules come from what each stage produces:

* ``ptq`` produces an int8 ONNX graph: no PyTorch stage can follow it.
* ``qat`` produces a model whose export is already a QDQ (integer) graph: quantizing it again
  with ``ptq`` would re-quantize the dequantized weights and double-count the error.
* ``codebook`` produces weights rebuilt in the graph from packed indices: ``ptq`` would replace the
  codebooks with int8 tensors (the size gain is lost), and ``qat``/``sparsify`` do not touch
  codebook layers.
* ``sparsify`` must come before ``qat``/``ptq``/``codebook``, which keep the N:M zeros (a zero stays
  zero under symmetric int8 quantization, the ``qat`` stage locks the mask, and the ``codebook``
  stage reserves an exact-zero codeword per codebook that the pruned weights keep).
* Each stage asks the target for the precision it produces (``ptq``/``qat`` -> int8,
  ``codebook`` -> codebook, ``sparsify`` -> nm-sparse).
"""

from __future__ import annotations

from typing import Any

from edgecompress.compress.errors import UnsupportedError

# (earlier stage, later stage) -> why that order cannot work
FORBIDDEN_ORDERS: dict[tuple[str, str], str] = {
    ("ptq", "sparsify"): "ptq produces an int8 ONNX graph; no PyTorch stage can follow it",
    ("ptq", "qat"): "ptq produces an int8 ONNX graph; no PyTorch stage can follow it",
    ("ptq", "codebook"): "ptq produces an int8 ONNX graph; no PyTorch stage can follow it",
    ("ptq", "ptq"): "the model is already int8 after the first ptq",
    ("qat", "ptq"): "a QAT model already exports as an integer QDQ graph; ptq would quantize it a second time",
    ("qat", "codebook"): "codebooks would replace the weights that QAT trained for its quantizers",
    ("qat", "sparsify"): "sparsify before qat: pruning after QAT breaks the learned quantization scales",
    ("codebook", "ptq"): "int8 ptq would replace the packed codebooks with int8 tensors and lose the size gain",
    ("codebook", "qat"): "qat does not quantize codebook layers; put qat before codebook is not supported either",
    ("codebook", "sparsify"): "codebook layers are not pruned",
}

STAGE_PRECISION = {"ptq": "int8", "qat": "int8", "codebook": "codebook", "sparsify": "nm-sparse"}


def check_stage_order(stage_names: list[str]) -> None:
    """Raise :class:`UnsupportedError` naming the first pair of stages that cannot follow each other."""
    for i, earlier in enumerate(stage_names):
        for later in stage_names[i + 1 :]:
            why = FORBIDDEN_ORDERS.get((earlier, later))
            if why:
                raise UnsupportedError(f"stage {later!r} cannot come after {earlier!r}: {why}")


def check_targets(stage_names: list[str], targets: list[Any]) -> None:
    """Raise :class:`UnsupportedError` when a target cannot run what a stage produces."""
    for name in stage_names:
        precision = STAGE_PRECISION.get(name)
        if precision is None:
            continue
        for t in targets:
            if not t.supports(precision):
                raise UnsupportedError(
                    f"stage {name!r} produces {precision!r} models, which target {t.name!r} does not run "
                    f"(it supports {', '.join(sorted(t.precisions))}); drop the stage or the target"
                )
