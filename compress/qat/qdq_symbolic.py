"""The export-time graph of an LSQ quantizer: ``QuantizeLinear``/``DequantizeLinear`` nodes emitted
while ``torch.onnx.export`` traces ``LSQQuantizer.forward`` (a leaf module: the quantizers import
it, and the QDQ exporter in :mod:`edgecompress.compress.qat.onnx_qdq` writes the file around it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class _Consts:
    """Constants handed to the symbolic functions (python objects pass through unchanged)."""

    fake: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    q_n: int
    q_p: int
    codes: torch.Tensor | None = None
    axis: int | None = None


def _const(g: Any, t: torch.Tensor) -> Any:
    return g.op("Constant", value_t=t)


class _WeightDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, fake: torch.Tensor, consts: _Consts) -> torch.Tensor:  # type: ignore[override]
        # tensors used here must be arguments: the tracer rejects tensors hidden in a python holder
        return fake.clone()

    @staticmethod
    def symbolic(g: Any, w: Any, fake: Any, consts: _Consts) -> Any:
        assert consts.codes is not None  # internal invariant: weight constants always carry codes
        args = [_const(g, consts.codes), _const(g, consts.scale), _const(g, consts.zero_point)]
        if consts.axis is None:
            return g.op("DequantizeLinear", *args)
        return g.op("DequantizeLinear", *args, axis_i=consts.axis)


class _ActQDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, consts: _Consts) -> torch.Tensor:  # type: ignore[override]
        return torch.clamp(torch.round(x / scale), -consts.q_n, consts.q_p) * scale

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any, consts: _Consts) -> Any:
        s = consts.scale
        lo, hi = (-128, 127) if consts.zero_point.dtype == torch.int8 else (0, 255)
        if (-consts.q_n, consts.q_p) != (lo, hi):
            x = g.op("Clip", x, _const(g, -consts.q_n * s), _const(g, consts.q_p * s))
        q = g.op("QuantizeLinear", x, _const(g, s), _const(g, consts.zero_point))
        return g.op("DequantizeLinear", q, _const(g, s), _const(g, consts.zero_point))


def _untraced(t: torch.Tensor) -> torch.Tensor:
    # a fresh tensor the ONNX tracer has never seen, so it can live inside a python constant holder
    return torch.from_numpy(t.detach().cpu().numpy().copy())


def qdq_for_export(
    v: torch.Tensor, scale: torch.Tensor, q_n: int, q_p: int, per_channel: bool, kind: str
) -> torch.Tensor:
    """The export-time graph of one LSQ quantizer (called from ``LSQQuantizer.forward``)."""
    s = _untraced(scale).float()
    if kind == "weight":
        codes = torch.clamp(torch.round(_untraced(v) / s), -q_n, q_p)
        fake = codes * s
        if per_channel:
            s1 = s.reshape(-1)
            consts = _Consts(
                fake, s1, torch.zeros(s1.shape, dtype=torch.int8), q_n, q_p, codes.to(torch.int8), 0
            )
        else:
            consts = _Consts(
                fake, s.reshape(()), torch.tensor(0, dtype=torch.int8), q_n, q_p, codes.to(torch.int8)
            )
        return _WeightDQ.apply(v, fake, consts)
    zp = torch.tensor(0, dtype=torch.int8 if q_n > 0 else torch.uint8)
    return _ActQDQ.apply(v, scale, _Consts(s, s.reshape(()), zp, q_n, q_p))
