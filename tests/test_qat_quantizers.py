"""LSQ quantizers against hand-computed values (forward, STE backward, the LSQ scale gradient, init)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from edgecompress.compress.qat.quantizers import LSQQuantizer, QuantWrapper, int_range, lsq_fake_quant


def test_int_ranges() -> None:
    assert int_range(4, signed=True) == (8, 7)
    assert int_range(3, signed=True) == (4, 3)
    assert int_range(4, signed=False) == (0, 15)
    assert int_range(8, signed=False) == (0, 255)


def test_signed_forward_backward_and_scale_gradient_by_hand() -> None:
    v = torch.tensor([-1.3, -0.2, 0.26, 0.9, 2.0], dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    # 3 bits signed: Q_N = 4, Q_P = 3; v/s = [-5.2, -0.8, 1.04, 3.6, 8.0]
    g = 1.0 / math.sqrt(3 * 5)
    out = lsq_fake_quant(v, s, 4, 3, g)
    assert torch.allclose(out, torch.tensor([-1.0, -0.25, 0.25, 0.75, 0.75], dtype=torch.float64))
    out.sum().backward()
    assert v.grad is not None and s.grad is not None
    assert torch.equal(v.grad, torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    # ds: -Q_N below, round(v/s) - v/s inside, Q_P above, times g
    expected = (-4 + (-1 + 0.8) + (1 - 1.04) + 3 + 3) * g
    assert s.grad.item() == pytest.approx(expected, rel=1e-12)


def test_unsigned_activation_quantizer_by_hand() -> None:
    q = LSQQuantizer(2, signed=False, kind="activation").double()
    with torch.no_grad():
        q.scale.fill_(0.25)
    q.initialized.fill_(True)
    x = torch.tensor([[-0.5, 0.375, 1.0]], dtype=torch.float64, requires_grad=True)
    # 2 bits unsigned: [0, 3]; x/s = [-2, 1.5, 4] -> clamp [0, 1.5, 3] -> round half to even [0, 2, 3]
    out = q(x)
    assert torch.equal(out, torch.tensor([[0.0, 0.5, 0.75]], dtype=torch.float64))
    out.sum().backward()
    assert x.grad is not None and q.scale.grad is not None
    assert torch.equal(x.grad, torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64))
    # g = 1 / sqrt(Q_P * features per sample) = 1 / sqrt(3 * 3)
    assert q.scale.grad.item() == pytest.approx((0 + (2 - 1.5) + 3) / 3.0, rel=1e-9)


def test_lsq_init_and_signedness_from_first_batch() -> None:
    q = LSQQuantizer(4, signed=None, kind="activation")
    x = torch.relu(torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(0)))
    q(x)
    assert not q.signed and q.qrange == (0, 15)
    assert q.scale.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(15), rel=1e-6)
    q2 = LSQQuantizer(4, signed=None, kind="activation")
    q2(x - 0.5)
    assert q2.signed and q2.qrange == (8, 7)


def test_per_channel_weight_scale_init_and_gradient() -> None:
    conv = nn.Conv2d(2, 3, 3, bias=False)
    w = QuantWrapper(conv, weight_bits=4, act_bits=4, per_channel=True)
    q = w.weight_quant
    assert q.scale.shape == (3, 1, 1, 1)
    mean_abs = conv.weight.detach().abs().mean(dim=(1, 2, 3))
    assert torch.allclose(q.scale.detach().reshape(-1), 2 * mean_abs / math.sqrt(7), rtol=1e-6)
    out = q(conv.weight)
    out.sum().backward()
    assert q.scale.grad is not None
    wv = conv.weight.detach()
    ratio = wv / q.scale.detach()
    inner = (torch.round(ratio.clamp(-8, 7)) - ratio) * ((ratio >= -8) & (ratio <= 7))
    edge = torch.where(ratio < -8, -8.0, 0.0) + torch.where(ratio > 7, 7.0, 0.0)
    g = 1 / math.sqrt(7 * 18)  # 18 weights share each channel's scale
    expected = ((inner + edge).sum(dim=(1, 2, 3)) * g).reshape(3, 1, 1, 1)
    assert torch.allclose(q.scale.grad, expected, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_codes_stay_in_range_for_every_bit_width(bits: int) -> None:
    q = LSQQuantizer(bits, signed=True, channel_shape=None)
    w = torch.randn(64, 16, generator=torch.Generator().manual_seed(bits)) * 3
    q.initialize(w)
    codes = q.integers(w)
    q_n, q_p = int_range(bits, True)
    assert codes.min() >= -q_n and codes.max() <= q_p
    assert torch.allclose(q(w), codes * q.scale)
    assert len(torch.unique(codes)) > min(2 ** (bits - 1), 16)  # the grid is used, not collapsed


class _SamePadConv(nn.Conv2d):
    """A conv that pads in its own forward, TensorFlow "same" style (asymmetric on stride 2), with
    ``padding=0`` on the module, as EfficientNet-Lite's and timm's Conv2dSame do."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, stride=2, padding=0)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, 0)


def test_wrapper_keeps_a_subclass_padding_in_its_forward() -> None:
    """Regression: the wrapper rebuilt the conv from ``layer.padding`` and dropped the padding the
    subclass applies itself (EfficientNet's 240x240 stem gave 119x119 instead of 120x120)."""
    torch.manual_seed(0)
    conv = _SamePadConv(3, 4)
    wrapped = QuantWrapper(conv, weight_bits=8, act_bits=8, per_channel=True)
    x = torch.randn(2, 3, 16, 16)
    ref = conv(x)
    out = wrapped(x)
    assert out.shape == ref.shape == (2, 4, 8, 8)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99  # 8-bit noise only
    assert isinstance(conv.weight, nn.Parameter)  # the float weight is back after the call
