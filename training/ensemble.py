"""M ensemble members fused into one module.

Every layer holds its members' parameters stacked along a leading `[M, ...]` axis and
runs all members in one batched op: convolutions are grouped convolutions with
`groups = M`, linear layers are batched matmuls, batch norm keeps per-member
statistics over `M * C` channels. A training step is one forward/backward for the
whole ensemble (no Python loop over members), and the same module exports to one
ONNX graph whose batch axis stays symbolic (no vmap involved).

Activations travel as `[batch, M * channels, H, W]` through convolutions and as
`[batch, M, features]` through linear layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.distributed import is_distributed, synced_batch_norm

__all__ = ["ARCHITECTURES", "Ensemble", "build_ensemble", "member_state_dict"]


def _uniform_fan_in_(tensor: torch.Tensor, fan_in: int) -> None:
    # PyTorch's default for Conv2d/Linear (kaiming_uniform with a=sqrt(5)) is U(+-1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(tensor, -bound, bound)


class EnsembleLinear(nn.Module):
    """`[batch, M, in] -> [batch, M, out]`, member m uses its own weight `[out, in]`."""

    def __init__(self, members: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(members, out_features))
        _uniform_fan_in_(self.weight, in_features)
        _uniform_fan_in_(self.bias, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [M, batch, in] @ [M, in, out]: one batched matmul for all members.
        out = torch.bmm(x.transpose(0, 1), self.weight.transpose(1, 2))
        return out.transpose(0, 1) + self.bias


class EnsembleConv2d(nn.Module):
    """`[batch, M * in, H, W] -> [batch, M * out, H', W']` as one grouped convolution."""

    def __init__(
        self,
        members: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
    ):
        super().__init__()
        self.members, self.stride, self.padding = members, stride, padding
        self.weight = nn.Parameter(torch.empty(members, out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(members, out_channels)) if bias else None
        fan_in = in_channels * kernel_size * kernel_size
        # He-normal for ReLU networks (as torchvision's ResNets): PyTorch's default uniform init
        # leaves the BN-free small CNN on a long loss plateau.
        nn.init.normal_(self.weight, std=math.sqrt(2.0 / fan_in))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.flatten(0, 1)  # [M * out, in, k, k]
        bias = None if self.bias is None else self.bias.flatten()
        return F.conv2d(x, weight, bias, self.stride, self.padding, groups=self.members)


class EnsembleBatchNorm2d(nn.Module):
    """Batch norm over `[batch, M * C, H, W]` with separate statistics per member and channel."""

    def __init__(self, members: int, channels: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(members, channels))
        self.bias = nn.Parameter(torch.zeros(members, channels))
        self.register_buffer("running_mean", torch.zeros(members, channels))
        self.register_buffer("running_var", torch.ones(members, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and is_distributed():  # statistics of the global batch, as in one process
            return synced_batch_norm(
                x,
                self.running_mean.view(-1),
                self.running_var.view(-1),
                self.weight.flatten(),
                self.bias.flatten(),
                self.momentum,
                self.eps,
            )
        # Flat views share storage, so batch_norm's in-place running-stat update lands in the buffers.
        return F.batch_norm(
            x,
            self.running_mean.view(-1),
            self.running_var.view(-1),
            self.weight.flatten(),
            self.bias.flatten(),
            self.training,
            self.momentum,
            self.eps,
        )


class _ToMemberFeatures(nn.Module):
    """`[batch, M * C, H, W] -> [batch, M, C]` by global average pooling."""

    def __init__(self, members: int):
        super().__init__()
        self.members = members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)).unflatten(1, (self.members, -1))


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
        _ToMemberFeatures(members),
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
    layers += [_ToMemberFeatures(members), EnsembleLinear(members, 512, classes)]
    return nn.Sequential(*layers)


ARCHITECTURES = ("mlp", "cnn", "resnet18", "preact_resnet18")


class Ensemble(nn.Module):
    """M fused members over raw inputs `[batch, *input_shape]`; normalization is part of the model."""

    def __init__(
        self,
        body: nn.Module,
        members: int,
        input_shape: Sequence[int],
        classes: int,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        super().__init__()
        self.body, self.members, self.classes = body, members, classes
        self.input_shape = tuple(input_shape)
        stats_shape = (-1,) + (1,) * (len(self.input_shape) - 1)  # per channel
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(stats_shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(stats_shape))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw `[batch, *input_shape]` -> the normalized space the members (and PCA) work in."""
        return (x - self.mean) / self.std

    def forward_members(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized inputs with one copy per member `[batch, M, *input_shape]` -> logits `[batch, M, classes]`.

        Member m only sees `z[:, m]`, so the gradient with respect to `z[:, m]` is member
        m's own input gradient.
        """
        return self.body(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw inputs `[batch, *input_shape]` -> member logits `[batch, M, classes]`."""
        z = self.normalize(x)
        return self.forward_members(z.unsqueeze(1).expand(-1, self.members, *z.shape[1:]))


def build_ensemble(
    arch: str,
    members: int,
    input_shape: Sequence[int],
    classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: int = 32,
    depth: int = 2,
) -> Ensemble:
    """Build a fused ensemble by architecture name (one of `ARCHITECTURES`)."""
    if arch == "mlp":
        body = _mlp(members, input_shape, classes, width, depth)
    elif arch == "cnn":
        body = _cnn(members, input_shape, classes, width, depth)
    elif arch in ("resnet18", "preact_resnet18"):
        body = _resnet18(members, input_shape, classes, preact=arch == "preact_resnet18")
    else:
        raise ValueError(f"model.arch: expected one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    return Ensemble(body, members, input_shape, classes, mean, std)


def member_state_dict(ensemble: Ensemble, index: int) -> dict[str, torch.Tensor]:
    """Member `index`'s weights as the state dict of a one-member ensemble of the same architecture."""
    shared = {"mean", "std"}  # normalization statistics are not per member
    return {
        name: value if name in shared else value[index : index + 1].clone()
        for name, value in ensemble.state_dict().items()
    }
