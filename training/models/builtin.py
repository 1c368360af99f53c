"""The built-in architectures as plain single-member modules: an MLP, a small CNN for 8x8 to 28x28
images, and ResNet-18 / PreAct-ResNet-18 in their CIFAR form (3x3 stem, no max-pool).

Members are fused by `training.models.fuse`, like any other architecture. Convolutions start
He-normal (fan-in) with zero bias, as torchvision's ResNets do (PyTorch's default uniform init
leaves the BN-free small CNN on a long loss plateau); linear layers keep PyTorch's default.
The Sequential positions match the fused layers these replaced, so run folders written before
keep loading.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.config import BUILTIN_ARCHITECTURES
from training.models.layers import FusedConv2d, FusedLinear

__all__ = ["BUILTIN", "build_builtin", "draw_as_fused_layers_did"]

BUILTIN = BUILTIN_ARCHITECTURES


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = True):
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=bias)
    nn.init.normal_(conv.weight, std=math.sqrt(2.0 / (in_channels * kernel * kernel)))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _global_pool() -> nn.Module:
    """`[batch, C, H, W] -> [batch, C]` by global average pooling."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _mlp(input_shape: Sequence[int], classes: int, width: int, depth: int) -> nn.Module:
    in_features = math.prod(input_shape)
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(depth):
        layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def _cnn(input_shape: Sequence[int], classes: int, width: int) -> nn.Module:
    """Small CNN for 8x8 to 28x28 images: two conv stages, global average pool, linear head."""
    return nn.Sequential(
        nn.Identity(),  # position 0 held the member fold in the fused layers' time
        _conv(input_shape[0], width, 3, padding=1),
        nn.ReLU(),
        _conv(width, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        _conv(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        _conv(2 * width, 2 * width, 3, padding=1),
        nn.ReLU(),
        _global_pool(),
        nn.Linear(2 * width, classes),
    )


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = _conv(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(_conv(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = _conv(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


def _resnet18(input_shape: Sequence[int], classes: int, preact: bool) -> nn.Module:
    """ResNet-18 in its CIFAR form: 3x3 stem, no max-pool, four stages of two blocks."""
    block = _PreActBlock if preact else _BasicBlock
    layers: list[nn.Module] = [nn.Identity(), _conv(input_shape[0], 64, 3, 1, 1, bias=False)]
    if not preact:
        layers += [nn.BatchNorm2d(64), nn.ReLU()]
    in_planes = 64
    for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for s in (stride, 1):
            layers.append(block(in_planes, planes, s))
            in_planes = planes
    if preact:
        layers += [nn.BatchNorm2d(512), nn.ReLU()]
    layers += [_global_pool(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def build_builtin(arch: str, input_shape: Sequence[int], classes: int, width: int = 32, depth: int = 2) -> nn.Module:
    """One plain member of a built-in architecture: `[batch, *input_shape]` -> logits `[batch, classes]`."""
    if arch == "mlp":
        return _mlp(input_shape, classes, width, depth)
    if arch == "cnn":
        return _cnn(input_shape, classes, width)
    return _resnet18(input_shape, classes, preact=arch == "preact_resnet18")


def draw_as_fused_layers_did(body: nn.Module) -> None:
    """Re-draw a fused built-in's weights as the fused layers that preceded the fusion pass drew them.

    Same distributions as the plain members' own init, but in that order: layer by layer, all M
    members at once (`[M, ...]`). Drawn from the random state the build started from, a seed gives
    bit for bit the ensemble it gave before, so earlier runs and recorded figures repeat (the
    quickstart's FoRDE-over-DE gradient diversity, measured for seed 0, depends on the draw).
    """
    for module in body.modules():
        if isinstance(module, FusedConv2d):
            fan_in = math.prod(module.weight.shape[2:])  # in / groups * kh * kw
            with torch.no_grad():
                nn.init.normal_(module.weight, std=math.sqrt(2.0 / fan_in))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        elif isinstance(module, FusedLinear):
            bound = 1.0 / math.sqrt(module.in_features)  # PyTorch's Linear default, U(+-1/sqrt(fan_in))
            with torch.no_grad():
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.uniform_(module.bias, -bound, bound)
