"""The built-in architectures, fused: an MLP, a small CNN for 8x8 to 28x28 images, and ResNet-18 /
PreAct-ResNet-18 in their CIFAR form (3x3 stem, no max-pool)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.models.layers import EnsembleBatchNorm2d, EnsembleConv2d, EnsembleLinear, ToMemberFeatures

__all__ = ["BUILTIN", "build_builtin"]

BUILTIN = ("mlp", "cnn", "resnet18", "preact_resnet18")


def _mlp(members: int, input_shape: Sequence[int], classes: int, width: int, depth: int) -> nn.Module:
    in_features = math.prod(input_shape)
    layers: list[nn.Module] = [nn.Flatten(2)]  # [batch, M, *input_shape] -> [batch, M, D]
    for i in range(depth):
        layers += [EnsembleLinear(members, in_features if i == 0 else width, width), nn.ReLU()]
    layers.append(EnsembleLinear(members, width, classes))
    return nn.Sequential(*layers)


def _cnn(members: int, input_shape: Sequence[int], classes: int, width: int, depth: int) -> nn.Module:
    """Small CNN for 8x8 to 28x28 images: two conv stages, global average pool, linear head."""
    channels = input_shape[0]
    return nn.Sequential(
        nn.Flatten(1, 2),  # [batch, M, C, H, W] -> [batch, M * C, H, W]
        EnsembleConv2d(members, channels, width, 3, padding=1),
        nn.ReLU(),
        EnsembleConv2d(members, width, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        EnsembleConv2d(members, width, 2 * width, 3, padding=1),
        nn.ReLU(),
        EnsembleConv2d(members, 2 * width, 2 * width, 3, padding=1),
        nn.ReLU(),
        ToMemberFeatures(members),
        EnsembleLinear(members, 2 * width, classes),
    )


class _BasicBlock(nn.Module):
    def __init__(self, members: int, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = EnsembleConv2d(members, in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = EnsembleBatchNorm2d(members, planes)
        self.conv2 = EnsembleConv2d(members, planes, planes, 3, 1, 1, bias=False)
        self.bn2 = EnsembleBatchNorm2d(members, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                EnsembleConv2d(members, in_planes, planes, 1, stride, bias=False), EnsembleBatchNorm2d(members, planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _PreActBlock(nn.Module):
    def __init__(self, members: int, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = EnsembleBatchNorm2d(members, in_planes)
        self.conv1 = EnsembleConv2d(members, in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = EnsembleBatchNorm2d(members, planes)
        self.conv2 = EnsembleConv2d(members, planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = EnsembleConv2d(members, in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


def _resnet18(members: int, input_shape: Sequence[int], classes: int, preact: bool) -> nn.Module:
    """ResNet-18 in its CIFAR form: 3x3 stem, no max-pool, four stages of two blocks."""
    block = _PreActBlock if preact else _BasicBlock
    layers: list[nn.Module] = [nn.Flatten(1, 2), EnsembleConv2d(members, input_shape[0], 64, 3, 1, 1, bias=False)]
    if not preact:
        layers += [EnsembleBatchNorm2d(members, 64), nn.ReLU()]
    in_planes = 64
    for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for s in (stride, 1):
            layers.append(block(members, in_planes, planes, s))
            in_planes = planes
    if preact:
        layers += [EnsembleBatchNorm2d(members, 512), nn.ReLU()]
    layers += [ToMemberFeatures(members), EnsembleLinear(members, 512, classes)]
    return nn.Sequential(*layers)


def build_builtin(
    arch: str, members: int, input_shape: Sequence[int], classes: int, width: int, depth: int
) -> nn.Module:
    """The fused body of a built-in architecture: `[batch, M, *input_shape]` -> logits `[batch, M, classes]`."""
    if arch == "mlp":
        return _mlp(members, input_shape, classes, width, depth)
    if arch == "cnn":
        return _cnn(members, input_shape, classes, width, depth)
    return _resnet18(members, input_shape, classes, preact=arch == "preact_resnet18")
