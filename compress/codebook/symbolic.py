"""The export-time graph of a codebook weight: one ``edgecompress.codebook::CodebookWeight*`` node
emitted while ``torch.onnx.export`` traces ``CodebookWeight.forward`` (a leaf module: the layers
import it, and :mod:`edgecompress.compress.codebook.onnx_export` defines the ONNX functions the
nodes call).
"""

from __future__ import annotations

from typing import Any

import torch

DOMAIN = "edgecompress.codebook"


def op_type(variant: str, bits: int, permuted: bool = False) -> str:
    return f"CodebookWeight{'Scales' if variant == 'scales' else 'Groups'}{'Permuted' if permuted else ''}{bits}"


def _dense_from_tensors(packed: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None,
                        bounds: torch.Tensor, row_gather: torch.Tensor, bits: int, out: int, d: int) -> torch.Tensor:  # fmt: skip
    from edgecompress.compress.codebook.packing import unpack_indices

    idx = unpack_indices(packed, bits, out * d).reshape(out, d)
    gid = (torch.arange(out)[:, None] >= bounds[None, :].to(torch.int64)).sum(dim=1)
    if scales is not None:
        w = codebook[0].float()[idx] * scales.float()[gid][:, None]
    else:
        w = codebook.float()[gid[:, None], idx]
    return w[row_gather.long()] if row_gather.numel() else w


class _CodebookWeightFunction(torch.autograd.Function):
    """Emits one ``edgecompress.codebook::CodebookWeight*`` node when traced by the ONNX exporter."""

    @staticmethod
    def forward(ctx: Any, packed: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor, bounds: torch.Tensor,
                shape2d: torch.Tensor, row_gather: torch.Tensor, variant: str, bits: int, out: int,
                d: int) -> torch.Tensor:  # fmt: skip
        scales_or_none = scales if variant == "scales" else None
        return _dense_from_tensors(packed, codebook, scales_or_none, bounds, row_gather, bits, out, d)

    @staticmethod
    def symbolic(g: Any, packed: Any, codebook: Any, scales: Any, bounds: Any, shape2d: Any, row_gather: Any,
                 variant: str, bits: int, out: int, d: int) -> Any:  # fmt: skip
        inputs = [packed, codebook, scales, bounds, shape2d] if variant == "scales" else [packed, codebook, bounds, shape2d]
        permuted = row_gather.type().sizes()[0] > 0
        if permuted:
            inputs.append(row_gather)
        res = g.op(f"{DOMAIN}::{op_type(variant, bits, permuted)}", *inputs)
        res.setType(codebook.type().with_dtype(torch.float32).with_sizes([out, d]))
        return res


def codebook_weight_op(store: Any) -> torch.Tensor:
    """The (out, D) weight of ``store`` in original row order, as a traceable custom op (ONNX export)."""
    return _CodebookWeightFunction.apply(store.packed, store.codebook, store.scales, store.bounds, store.shape2d,
                                         store.row_gather, store.variant, store.bits, store.rows,
                                         store.row_length)  # fmt: skip
