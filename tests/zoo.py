"""An architecture zoo: small models, one graph hazard each, for registry-driven technique tests.

Every entry is a tiny image classifier for (N, 1, 28, 28) inputs with 10 classes, built around one
structure that compression code has to handle exactly: a squeeze-excite gate, depthwise and grouped
convolutions, a channel shuffle, residual adds, a concatenation, a module called twice, a layer
feeding two consumers, self-attention with LayerNorm and GELU, Conv2d/Linear subclasses with their
own ``forward``, reflect padding, a model with two outputs, modules defined out of execution order.

``ZOO`` maps a name to a :class:`ZooEntry`; ``train_zoo_model`` trains one briefly on real data
(scikit-learn's digits upsampled to 28x28, ``compress.data.load_splits("digits")``).

Example:
    >>> model = ZOO["se_mobilenetv3"].build()
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model.

    Attributes:
        build: the factory (seeded by the caller).
        hazard: what the model exercises.
        must_fold: layers whose JLCM row permutation can provably be folded into the next layer
            (single consumer through permutation-equivariant operations); a folding that refuses them
            is needlessly conservative.
        steps, lr: training length and Adam learning rate on digits.
    """

    build: Callable[[], nn.Module]
    hazard: str
    must_fold: frozenset[str] = frozenset()
    steps: int = 250
    lr: float = 3e-3


ZOO: dict[str, ZooEntry] = {}


def register(name: str, hazard: str, *, must_fold: tuple[str, ...] = (), steps: int = 250,
             lr: float = 3e-3) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:  # fmt: skip
    def wrap(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        if name in ZOO:
            raise ValueError(f"zoo model {name!r} registered twice")
        ZOO[name] = ZooEntry(build, hazard, frozenset(must_fold), steps, lr)
        return build

    return wrap


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU,
             **kw: object) -> nn.Sequential:  # fmt: skip
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False, **kw),  # type: ignore[arg-type]
                               nn.BatchNorm2d(cout)]  # fmt: skip
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class _Head(nn.Module):
    """Average pool of a ``size`` x ``size`` map to a 2x2 grid, flatten, Linear. (An AvgPool2d, not an
    adaptive pool: ONNX export refuses adaptive output sizes that do not divide the input.)"""

    def __init__(self, cin: int, size: int = 7) -> None:
        super().__init__()
        k = (size + 1) // 2
        self.pool = nn.AvgPool2d(k, size - k)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin * 4, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(x)))


# --- squeeze-excite gate (MobileNetV3) ------------------------------------------------------------


class SqueezeExcite(nn.Module):
    """``x * hardsigmoid(conv(relu(conv(avgpool(x)))))`` (MobileNetV3's gate)."""

    def __init__(self, ch: int, rd: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv_reduce = nn.Conv2d(ch, rd, 1)
        self.act = nn.ReLU()
        self.conv_expand = nn.Conv2d(rd, ch, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.conv_expand(self.act(self.conv_reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    """1x1 expand, depthwise 3x3, optional squeeze-excite, 1x1 project, residual add when shapes allow."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, se: bool, act: type[nn.Module]) -> None:
        super().__init__()
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.act1 = act()
        self.conv_dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.act2 = act()
        self.se = SqueezeExcite(mid, max(mid // 4, 4)) if se else nn.Identity()
        self.conv_pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.bn1(self.conv_pw(x)))
        y = self.se(self.act2(self.bn2(self.conv_dw(y))))
        y = self.bn3(self.conv_pwl(y))
        return x + y if self.residual else y


@register("se_mobilenetv3", "inverted residuals: depthwise 3x3, hardswish, squeeze-excite gate, residual adds",
          must_fold=("blocks.0.se.conv_reduce", "blocks.2.se.conv_reduce", "conv_head"))  # fmt: skip
def se_mobilenetv3() -> nn.Module:
    class TinyMobileNetV3(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = _conv_bn(1, 8, 3, 2, act=nn.Hardswish)
            self.blocks = nn.Sequential(
                InvertedResidual(8, 16, 8, 1, se=True, act=nn.Hardswish),
                InvertedResidual(8, 24, 12, 2, se=False, act=nn.ReLU),
                InvertedResidual(12, 24, 12, 1, se=True, act=nn.Hardswish),
            )
            self.conv_head = nn.Conv2d(12, 32, 1)
            self.act = nn.Hardswish()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.classifier = nn.Linear(32, NUM_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.blocks(self.stem(x))
            return self.classifier(self.flatten(self.pool(self.act(self.conv_head(x)))))

    return TinyMobileNetV3()


# --- depthwise and grouped convolutions, channel shuffle -----------------------------------------


@register("depthwise_grouped", "a depthwise conv and a grouped conv, each feeding a dense conv",
          must_fold=("stem.0", "dense.0"))  # fmt: skip
def depthwise_grouped() -> nn.Module:
    class DepthwiseGrouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = _conv_bn(1, 8, 3, 2)
            self.pw = _conv_bn(8, 16, 1)
            self.dw = _conv_bn(16, 16, 3, 1, groups=16)
            self.grouped = _conv_bn(16, 16, 3, 2, groups=4)
            self.dense = _conv_bn(16, 16, 1)
            self.head = _Head(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.dense(self.grouped(self.dw(self.pw(self.stem(x))))))

    return DepthwiseGrouped()


class ShuffleUnit(nn.Module):
    """ShuffleNet unit: grouped 1x1, channel shuffle, depthwise 3x3, grouped 1x1, residual add."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.gconv1 = _conv_bn(ch, ch, 1, groups=groups)
        self.dw = _conv_bn(ch, ch, 3, groups=ch, act=None)
        self.gconv2 = _conv_bn(ch, ch, 1, groups=groups, act=None)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gconv1(x)
        n, c, h, w = y.shape
        y = y.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.act(x + self.gconv2(self.dw(y)))


@register("channel_shuffle", "grouped 1x1 convs around a channel shuffle (view/transpose/reshape)")
def channel_shuffle() -> nn.Module:
    class ShuffleNetTiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = _conv_bn(1, 16, 3, 2)
            self.unit1 = ShuffleUnit(16, 4)
            self.down = nn.MaxPool2d(2)
            self.unit2 = ShuffleUnit(16, 4)
            self.head = _Head(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.unit2(self.down(self.unit1(self.stem(x)))))

    return ShuffleNetTiny()


# --- residual adds, concatenation, fan-out, shared modules ---------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block (a 1x1 projection shortcut when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = _conv_bn(cout, cout, 3, act=None)
        self.shortcut = _conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


@register("residual", "ResNet basic blocks: residual adds, a projection shortcut",
          must_fold=("block1.conv1.0", "block2.conv1.0"))  # fmt: skip
def residual() -> nn.Module:
    class TinyResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = _conv_bn(1, 8, 3, 2)
            self.block1 = BasicBlock(8, 8, 1)
            self.block2 = BasicBlock(8, 16, 2)
            self.head = _Head(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.block2(self.block1(self.stem(x))))

    return TinyResNet()


@register("concat", "two branches concatenated on channels, then BatchNorm and a conv", must_fold=("fuse",))
def concat() -> nn.Module:
    class TinyInception(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = _conv_bn(1, 8, 3, 2)
            self.branch1 = nn.Conv2d(8, 8, 1)
            self.branch3 = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(16)
            self.act = nn.ReLU()
            self.fuse = nn.Conv2d(16, 16, 3, 2, 1)
            self.act2 = nn.ReLU()
            self.head = _Head(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            y = self.act(self.bn(torch.cat([self.branch1(x), self.branch3(x)], dim=1)))
            return self.head(self.act2(self.fuse(y)))

    return TinyInception()


@register("shared_module", "one conv-ReLU module called twice (weights shared between two call sites)")
def shared_module() -> nn.Module:
    class SharedTwice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 16, 3, 2, 1)
            self.act = nn.ReLU()
            self.shared = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
            self.head = _Head(16, 14)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.shared(self.shared(self.act(self.stem(x)))))

    return SharedTwice()


@register("two_consumers", "a layer's output read by two convs (fan-out), and a conv feeding BatchNorm and an add",
          must_fold=("conv", "conv_a", "conv_b"))  # fmt: skip (conv: folded into both readers)
def two_consumers() -> nn.Module:
    class FanOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, 2, 1)
            self.bn = nn.BatchNorm2d(8)
            self.act = nn.ReLU()
            self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
            self.conv_b = nn.Conv2d(8, 8, 1)
            self.mix_a = nn.Conv2d(8, 16, 3, 2, 1)
            self.mix_b = nn.Conv2d(8, 16, 3, 2, 1)
            self.conv_c = nn.Conv2d(16, 16, 1)
            self.bn_c = nn.BatchNorm2d(16)
            self.head = _Head(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.act(self.bn(self.conv(x)))  # y feeds conv_a and conv_b
            h = self.mix_a(torch.relu(self.conv_a(y))) + self.mix_b(torch.relu(self.conv_b(y)))
            z = self.conv_c(torch.relu(h))  # z feeds bn_c and the add
            return self.head(torch.relu(self.bn_c(z)) + z)

    return FanOut()


# --- self-attention over patches -----------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention (qkv Linear, heads by reshape, softmax, output projection)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(n, t, c)
        return self.proj(y)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@register("attention", "patch embedding, LayerNorm, multi-head self-attention, GELU MLP, residual adds",
          must_fold=("blocks.0.mlp.fc1",), steps=400)  # fmt: skip
def attention() -> nn.Module:
    class TinyViT(nn.Module):
        def __init__(self, dim: int = 24) -> None:
            super().__init__()
            self.patch = nn.Conv2d(1, dim, 4, 4)  # 7x7 = 49 tokens
            self.pos = nn.Parameter(torch.randn(1, 49, dim) * 0.02)
            self.blocks = nn.Sequential(TransformerBlock(dim, 2))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, NUM_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
            return self.head(self.norm(self.blocks(t)).mean(1))

    return TinyViT()


# --- layers with their own forward, padding modes ------------------------------------------------


class Conv2dSame(nn.Conv2d):
    """TensorFlow "same" padding computed from the input size in ``forward`` (timm's ``Conv2dSame``,
    EfficientNet-Lite): asymmetric on stride 2, ``padding=0`` on the module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


@register("conv_same_padding", "an nn.Conv2d subclass padding TF-style in its own forward (padding=0 on the module)")
def conv_same_padding() -> nn.Module:
    class SamePadNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = Conv2dSame(1, 8, 3, 2)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = Conv2dSame(8, 16, 3, 2)
            self.bn2 = nn.BatchNorm2d(16)
            self.conv3 = Conv2dSame(16, 16, 3, 2)
            self.act = nn.ReLU()
            self.head = _Head(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.act(self.bn1(self.conv1(x)))
            x = self.act(self.bn2(self.conv2(x)))
            return self.head(self.act(self.conv3(x)))

    return SamePadNet()


class WeightNormLinear(nn.Linear):
    """An nn.Linear subclass with its own forward: each row of the weight is normalised and scaled by
    a learned per-output gain ``g`` (weight normalisation, Salimans & Kingma 2016)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout)
        self.g = nn.Parameter(torch.full((cout,), 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * (self.g / self.weight.norm(dim=1).clamp(min=1e-8))[:, None]
        return F.linear(x, w, self.bias)


@register("linear_subclass", "an nn.Linear subclass with its own forward (weight normalisation, per-row gain)")
def linear_subclass() -> nn.Module:
    class WeightNormMlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = _conv_bn(1, 8, 3, 2)
            self.pool = nn.MaxPool2d(2)
            self.flatten = nn.Flatten()
            self.fc1 = WeightNormLinear(8 * 7 * 7, 32)
            self.act = nn.ReLU()
            self.fc2 = WeightNormLinear(32, NUM_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.act(self.fc1(self.flatten(self.pool(self.stem(x))))))

    return WeightNormMlp()


@register("reflect_padding", "convs with padding_mode='reflect'", must_fold=("conv1", "conv2"))
def reflect_padding() -> nn.Module:
    class ReflectNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, 2, 1, padding_mode="reflect")
            self.bn1 = nn.BatchNorm2d(16)
            self.conv2 = nn.Conv2d(16, 16, 3, 2, 1, padding_mode="reflect")
            self.act = nn.ReLU()
            self.head = _Head(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.act(self.conv2(self.act(self.bn1(self.conv1(x))))))

    return ReflectNet()


# --- outputs and module order --------------------------------------------------------------------


@register("two_outputs", "returns a tuple (logits, embedding); the embedding also feeds the classifier",
          must_fold=("conv1",), steps=400)  # fmt: skip
def two_outputs() -> nn.Module:
    class LogitsAndEmbedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, 2, 1)
            self.act = nn.ReLU()
            self.conv2 = nn.Conv2d(16, 16, 3, 2, 1)
            self.pool = nn.AvgPool2d(4, 3)  # 7x7 -> 2x2
            self.fc = nn.Linear(16 * 4, NUM_CLASSES)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            emb = torch.flatten(self.pool(torch.relu(self.conv2(self.act(self.conv1(x))))), 1)
            return self.fc(emb), emb

    return LogitsAndEmbedding()


@register("out_of_order", "modules defined in another order than they run (the head before the convs)",
          must_fold=("conv1", "conv2"))  # fmt: skip
def out_of_order() -> nn.Module:
    class DefinedBackwards(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16 * 4 * 4, NUM_CLASSES)
            self.conv2 = nn.Conv2d(8, 16, 3, 2, 1)
            self.bn = nn.BatchNorm2d(8)
            self.conv1 = nn.Conv2d(1, 8, 3, 2, 1)
            self.pool = nn.AvgPool2d(4, 1)  # 7x7 -> 4x4

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
            return self.fc(torch.flatten(self.pool(x), 1))

    return DefinedBackwards()


# --- training --------------------------------------------------------------------------------------


def logits_of(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The classification logits of a zoo model's output (the first element of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def train_zoo_model(name: str, x: np.ndarray, y: np.ndarray, *, seed: int = 0, batch_size: int = 64) -> nn.Module:
    """Build zoo model ``name`` with ``seed`` and train it with Adam and cross-entropy on ``(x, y)``.

    Returns the model in eval mode.
    """
    entry = ZOO[name]
    torch.manual_seed(seed)
    model = entry.build()
    xs, ys = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    opt = torch.optim.Adam(model.parameters(), lr=entry.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=entry.lr, total_steps=entry.steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(entry.steps):
        idx = torch.randint(0, len(xs), (batch_size,), generator=gen)
        loss = F.cross_entropy(logits_of(model(xs[idx])), ys[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()
