"""Fused equivalents of standard layers: M members' layers as one module, members folded into channels.

Activations carry the members member-major in the channel dimension: `[batch, M * C, H, W]` for
channels-first tensors, `[..., M * C]` in the last dimension for channels-last ones (ConvNeXt's
permuted blocks). Every per-member tensor is stacked along a leading `[M, ...]` axis under the
original name, so member m's plain state dict is `{key: value[m]}`. Convolutions run as one
grouped convolution (each member's groups kept: `groups * M`), linear layers as one batched
matmul, normalization layers keep per-member statistics and affine parameters.

Built by `training.models.fuse.fuse_members` from M plain copies; nothing here draws random numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.distributed import is_distributed, synced_batch_norm

__all__ = [
    "FusedBatchNorm",
    "FusedCNBlock",
    "FusedConv2d",
    "FusedGroupNorm",
    "FusedLayerNorm",
    "FusedLayerNorm2d",
    "FusedLinear",
    "FusedStochasticDepth",
    "TwiceDifferentiableHardsigmoid",
    "TwiceDifferentiableHardswish",
]


def _stacked(tensors: Sequence[torch.Tensor | None]) -> nn.Parameter | None:
    """The members' parameters stacked `[M, ...]`, trainable if the first member's was."""
    if tensors[0] is None:
        return None
    return nn.Parameter(torch.stack([t.detach() for t in tensors]), requires_grad=tensors[0].requires_grad)


def _stacked_buffer(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.stack([t.detach() for t in tensors])


class FusedConv2d(nn.Module):
    """M `nn.Conv2d` as one grouped convolution: `[batch, M * in, H, W] -> [batch, M * out, H', W']`.

    weight `[M, out, in / groups, kh, kw]`, bias `[M, out]`; each member's own groups stay
    groups, so the fused convolution has `groups * M` (a depthwise convolution stays depthwise).
    """

    def __init__(self, convs: Sequence[nn.Conv2d]):
        super().__init__()
        first = convs[0]
        self.members = len(convs)
        self.in_channels, self.out_channels = first.in_channels, first.out_channels
        self.kernel_size, self.stride, self.padding = first.kernel_size, first.stride, first.padding
        self.dilation, self.groups, self.padding_mode = first.dilation, first.groups, first.padding_mode
        self._reversed_padding_repeated_twice = first._reversed_padding_repeated_twice
        self.weight = _stacked([c.weight for c in convs])
        self.register_parameter("bias", _stacked([c.bias for c in convs]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.flatten(0, 1)  # [M * out, in / groups, kh, kw], member-major
        bias = None if self.bias is None else self.bias.flatten()
        groups = self.groups * self.members
        if self.padding_mode != "zeros":
            padded = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(padded, weight, bias, self.stride, 0, self.dilation, groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def extra_repr(self) -> str:
        return (
            f"members={self.members}, {self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"bias={self.bias is not None}, padding_mode={self.padding_mode}"
        )


class FusedLinear(nn.Module):
    """M `nn.Linear` as one batched matmul over the last dimension: `[..., M * in] -> [..., M * out]`.

    weight `[M, out, in]`, bias `[M, out]`.
    """

    def __init__(self, linears: Sequence[nn.Linear]):
        super().__init__()
        first = linears[0]
        self.members, self.in_features, self.out_features = len(linears), first.in_features, first.out_features
        self.weight = _stacked([lin.weight for lin in linears])
        self.register_parameter("bias", _stacked([lin.bias for lin in linears]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.members, self.in_features).transpose(0, 1)  # [M, rows, in]
        out = torch.bmm(rows, self.weight.transpose(1, 2))  # [M, rows, out]
        if self.bias is not None:
            out = out + self.bias.unsqueeze(1)
        return out.transpose(0, 1).reshape(*lead, self.members * self.out_features)

    def extra_repr(self) -> str:
        return (
            f"members={self.members}, in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


class FusedBatchNorm(nn.Module):
    """M `nn.BatchNorm1d/2d/3d` over `[batch, M * C, ...]`: statistics per member and channel.

    weight, bias, running_mean, running_var `[M, C]`, num_batches_tracked `[M]`; same momentum and
    eps as the members. Under torch.distributed, training-mode statistics are those of the global
    batch (`training.distributed.synced_batch_norm`), as in one process.
    """

    def __init__(self, norms: Sequence[nn.modules.batchnorm._BatchNorm]):
        super().__init__()
        first = norms[0]
        self.members, self.num_features = len(norms), first.num_features
        self.eps, self.momentum = first.eps, first.momentum
        self.affine, self.track_running_stats = first.affine, first.track_running_stats
        self.register_parameter("weight", _stacked([n.weight for n in norms]))
        self.register_parameter("bias", _stacked([n.bias for n in norms]))
        self.register_buffer("running_mean", _stacked_buffer([n.running_mean for n in norms]))
        self.register_buffer("running_var", _stacked_buffer([n.running_var for n in norms]))
        self.register_buffer("num_batches_tracked", _stacked_buffer([n.num_batches_tracked for n in norms]))

    def _factor(self) -> float:
        """The running statistics' update factor, counting this batch (as `nn.BatchNorm2d` does)."""
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative average; the fusion pass checked the members' counts agree
            return 1.0 / float(self.num_batches_tracked[0])
        return self.momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = self._factor()
        # Flat views share storage, so batch_norm's in-place running-stat update lands in the buffers.
        mean = None if self.running_mean is None else self.running_mean.view(-1)
        var = None if self.running_var is None else self.running_var.view(-1)
        weight = None if self.weight is None else self.weight.flatten()
        bias = None if self.bias is None else self.bias.flatten()
        use_batch = self.training or mean is None
        if use_batch and is_distributed():  # statistics of the global batch, as in one process
            return self._synced(x, mean, var, weight, bias, factor)
        return F.batch_norm(x, mean, var, weight, bias, use_batch, factor, self.eps)

    def _synced(self, x, mean, var, weight, bias, factor) -> torch.Tensor:
        channels = x.shape[1]
        if weight is None:
            weight, bias = x.new_ones(channels), x.new_zeros(channels)
        if mean is None:  # no running statistics to keep: update throwaway ones
            mean, var = x.new_zeros(channels), x.new_ones(channels)
        as_4d = x.reshape(x.shape[0], channels, -1, 1)  # [batch, M * C, L, 1]: 1d/3d inputs too
        return synced_batch_norm(as_4d, mean, var, weight, bias, factor, self.eps).view_as(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors):
        # Weights saved before batch norm counted its batches (and nn.BatchNorm's own v1 files) have
        # no num_batches_tracked: start it at 0, as PyTorch's batch norm does.
        key = prefix + "num_batches_tracked"
        if self.num_batches_tracked is not None and key not in state_dict:
            state_dict[key] = torch.zeros_like(self.num_batches_tracked)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors)

    def extra_repr(self) -> str:
        return (
            f"members={self.members}, {self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )


class FusedLayerNorm(nn.Module):
    """M `nn.LayerNorm` over the last dimension `[..., M * C]`: each member's C features normalized
    on their own, with its own affine (weight, bias `[M, C]`)."""

    def __init__(self, norms: Sequence[nn.LayerNorm]):
        super().__init__()
        first = norms[0]
        self.members, self.normalized_shape, self.eps = len(norms), tuple(first.normalized_shape), first.eps
        self.register_parameter("weight", _stacked([n.weight for n in norms]))
        self.register_parameter("bias", _stacked([n.bias for n in norms]))

    def _normalize_last(self, x: torch.Tensor) -> torch.Tensor:
        per_member = F.layer_norm(x.unflatten(-1, (self.members, -1)), self.normalized_shape, None, None, self.eps)
        if self.weight is not None:
            per_member = per_member * self.weight
        if self.bias is not None:
            per_member = per_member + self.bias
        return per_member.flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._normalize_last(x)

    def extra_repr(self) -> str:
        return f"members={self.members}, {self.normalized_shape}, eps={self.eps}"


class FusedLayerNorm2d(FusedLayerNorm):
    """M torchvision `LayerNorm2d` (ConvNeXt): layer norm over the channels of `[batch, M * C, H, W]`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._normalize_last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FusedGroupNorm(nn.Module):
    """M `nn.GroupNorm(G, C)` over `[batch, M * C, ...]`: one group norm with `G * M` groups, each
    member's groups on their own, per-member affine (weight, bias `[M, C]`)."""

    def __init__(self, norms: Sequence[nn.GroupNorm]):
        super().__init__()
        first = norms[0]
        self.members, self.num_groups, self.num_channels, self.eps = (
            len(norms),
            first.num_groups,
            first.num_channels,
            first.eps,
        )
        self.register_parameter("weight", _stacked([n.weight for n in norms]))
        self.register_parameter("bias", _stacked([n.bias for n in norms]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.flatten()
        bias = None if self.bias is None else self.bias.flatten()
        return F.group_norm(x, self.num_groups * self.members, weight, bias, self.eps)


class FusedStochasticDepth(nn.Module):
    """M torchvision `StochasticDepth` over `[batch, M * C, ...]` (members in dimension 1).

    "row": one keep-or-drop decision per (input, member); "batch": one per member. Kept branches
    are scaled by 1 / (1 - p), as torchvision does.
    """

    def __init__(self, members: int, p: float, mode: str):
        super().__init__()
        self.members, self.p, self.mode = members, p, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        size = [x.shape[0] if self.mode == "row" else 1, self.members] + [1] * (x.ndim - 1)
        noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(survival)
        if survival > 0.0:
            noise.div_(survival)
        return (x.unflatten(1, (self.members, -1)) * noise).flatten(1, 2)

    def extra_repr(self) -> str:
        return f"members={self.members}, p={self.p}, mode={self.mode}"


class FusedCNBlock(nn.Module):
    """M torchvision ConvNeXt `CNBlock`s: the fused block, per-member layer_scale `[M, C, 1, 1]`."""

    def __init__(self, block: nn.Module, layer_scale: torch.Tensor, stochastic_depth: nn.Module):
        super().__init__()
        self.block = block
        self.layer_scale = nn.Parameter(layer_scale)
        self.stochastic_depth = stochastic_depth

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torchvision's name
        result = self.layer_scale.flatten(0, 1) * self.block(input)
        return self.stochastic_depth(result) + input


class TwiceDifferentiableHardsigmoid(nn.Module):
    """`nn.Hardsigmoid` as `relu6(x + 3) / 6`: equal in forward, and differentiable twice (PyTorch's
    hardsigmoid has no double backward, which the FoRDE step needs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


class TwiceDifferentiableHardswish(nn.Module):
    """`nn.Hardswish` as `x * relu6(x + 3) / 6`: equal in forward, and differentiable twice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) / 6.0
