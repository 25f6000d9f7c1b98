"""Built-in example models, all sized for 1x28x28 inputs and 10 classes.

They are small enough to train on the built-in MNIST in about a minute on two CPU cores, and
cover the architectures that make compression hard: plain convs, depthwise-separable blocks
(MobileNetV2), residual blocks (ResNet), fire modules (SqueezeNet), channel shuffles
(ShuffleNet) and attention (ViT).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU(inplace=False))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Two conv blocks and a two-layer classifier (LeNet-like, with BatchNorm)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(in_chans, width),
            nn.MaxPool2d(2),
            _conv_bn(width, 2 * width),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 7 * 7, 64),
            nn.ReLU(inplace=False),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            _conv_bn(cin, hidden, 1),
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, cout, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_res else out


class MobileNetV2Tiny(nn.Module):
    """MobileNetV2-style net: inverted residuals with depthwise convs."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.stem = _conv_bn(in_chans, 16, 3, 1)
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 1, 2),
            InvertedResidual(16, 24, 2, 3),
            InvertedResidual(24, 24, 1, 3),
            InvertedResidual(24, 32, 2, 3),
            InvertedResidual(32, 32, 1, 3),
        )
        self.head = nn.Sequential(_conv_bn(32, 96, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = _conv_bn(cout, cout, 3, 1, act=False)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else _conv_bn(cin, cout, 1, stride, act=False)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetTiny(nn.Module):
    """ResNet-style net: three stages of basic residual blocks."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.stem = _conv_bn(in_chans, 16)
        self.layers = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU(inplace=False))
        self.expand1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU(inplace=False))
        self.expand3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU(inplace=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        return torch.cat([self.expand1(s), self.expand3(s)], dim=1)


class SqueezeNetTiny(nn.Module):
    """SqueezeNet-style net: fire modules (squeeze 1x1, expand 1x1 + 3x3), no BatchNorm, conv head."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 32, 3, padding=1),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2),
            Fire(32, 8, 24),
            Fire(48, 8, 24),
            nn.MaxPool2d(2),
            Fire(48, 12, 32),
        )
        self.classifier = nn.Sequential(
            nn.Conv2d(64, num_classes, 1), nn.ReLU(inplace=False), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        branch = cout // 2
        self.branch1: nn.Module
        if stride == 2:
            self.branch1 = nn.Sequential(_conv_bn(cin, cin, 3, 2, groups=cin, act=False), _conv_bn(cin, branch, 1))
            inner_in = cin
        else:
            self.branch1 = nn.Identity()
            inner_in = cin // 2
        self.branch2 = nn.Sequential(
            _conv_bn(inner_in, branch, 1),
            _conv_bn(branch, branch, 3, stride, groups=branch, act=False),
            _conv_bn(branch, branch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.branch2(b)], dim=1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2Tiny(nn.Module):
    """ShuffleNetV2-style net: channel split, depthwise convs and channel shuffle."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.stem = _conv_bn(in_chans, 24, 3, 1)
        self.stages = nn.Sequential(
            ShuffleUnit(24, 48, 2), ShuffleUnit(48, 48, 1), ShuffleUnit(48, 96, 2), ShuffleUnit(96, 96, 1)
        )
        self.head = nn.Sequential(_conv_bn(96, 128, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        out = att.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTTiny(nn.Module):
    """A small Vision Transformer: 4x4 patches, 4 blocks of width 64, mean-pooled tokens."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, dim: int = 64, depth: int = 4, heads: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(in_chans, dim, 4, 4)
        self.pos = nn.Parameter(torch.zeros(1, 49, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


def cnn(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    return SmallCNN(num_classes, in_chans)


def mobilenetv2(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    return MobileNetV2Tiny(num_classes, in_chans)


def resnet(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    return ResNetTiny(num_classes, in_chans)


def squeezenet(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    return SqueezeNetTiny(num_classes, in_chans)


def shufflenet(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    return ShuffleNetV2Tiny(num_classes, in_chans)


def vit(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    return ViTTiny(num_classes, in_chans)
