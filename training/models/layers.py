"""Layers that run M ensemble members as one batched op.

Every layer holds its members' parameters stacked along a leading `[M, ...]` axis:
convolutions are grouped convolutions with `groups = M`, linear layers are batched matmuls,
batch norm keeps per-member statistics over `M * C` channels. Activations travel as
`[batch, M * channels, H, W]` through convolutions and as `[batch, M, features]` through
linear layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.distributed import is_distributed, synced_batch_norm

__all__ = ["EnsembleBatchNorm2d", "EnsembleConv2d", "EnsembleLinear", "ToMemberFeatures"]


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


class ToMemberFeatures(nn.Module):
    """`[batch, M * C, H, W] -> [batch, M, C]` by global average pooling."""

    def __init__(self, members: int):
        super().__init__()
        self.members = members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)).unflatten(1, (self.members, -1))
