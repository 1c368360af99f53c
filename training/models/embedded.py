"""Embedded ensembles: M members that share ONE set of weights and differ by small per-member modulations.

BatchEnsemble (Wen, Tran, Ba, ICLR 2020), in the embedded-ensemble form of docs/design.md section 11:
member a of a convolution or linear layer computes y_a = ((x_a o r_a) W) o s_a + b_a, i.e. its weight
is W_a = W o (r_a s_a^T) = diag(r_a) W diag(s_a): r_a scales the input channels, s_a the output
channels, b_a is the member's own bias. An MC-dropout ensemble has no trained modulations: r_a is a
fixed Bernoulli(keep) 0/1 mask per member (kept channels scaled by 1 / keep, as in dropout), drawn
once (like Masksembles), on the input channels of every layer but the first (the one that reads the
picture), so the members are deterministic.

Activations keep the fusion pass's member-major layout `[batch, M * C, ...]` (`training.models.layers`),
so per-member batch norm, pooling, heads, FoRDE's input gradients and the export work unchanged; a
shared layer runs as ONE ordinary convolution / matmul over the batch viewed as `[batch * M, C, ...]`.

`embed_member(member, M, ...)` swaps a plain member's layers (the fusion pass with its own rules for
Conv2d and Linear; normalization layers get per-member statistics as in independent ensembles), and
`fold_embedded(body)` turns the result into the fusion pass's module with per-member weights
W_a = diag(r_a) W diag(s_a): exactly the same function, one grouped graph (the "folded" layout).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.models.fuse import check_fused, fuse_members
from training.models.layers import FusedConv2d, FusedLinear

__all__ = [
    "EMBEDDED",
    "MODULATION_INITS",
    "EmbeddedConv2d",
    "EmbeddedLinear",
    "embed_member",
    "fold_embedded",
    "folded_copies",
]

EMBEDDED = ("batchensemble", "mc_dropout")  # ensemble.structure values built here
MODULATION_INITS = ("random_sign", "normal")


def _draw_modulation(members: int, size: int, init: str) -> torch.Tensor:
    """`[M, size]` from the global RNG: random signs +-1 (mean 0) or N(1, 0.5) (mean 1)."""
    if init == "random_sign":
        return torch.randint(0, 2, (members, size)).float() * 2.0 - 1.0
    if init == "normal":
        return 1.0 + 0.5 * torch.randn(members, size)
    raise ValueError(f"embedded.init: expected one of {', '.join(MODULATION_INITS)}, got {init!r}")


def _draw_mask(members: int, size: int, keep: float) -> torch.Tensor:
    """`[M, size]`: each channel kept with probability `keep`, a member keeps at least one channel; kept
    channels are scaled by 1 / keep, as PyTorch's dropout scales them, so a layer's expected input
    stays what the member's initialization was made for (measured on digits, 4 members, 15 epochs,
    keep 0.8: test accuracy 0.953 with the scaling, 0.889 with a bare 0/1 mask)."""
    mask = (torch.rand(members, size) < keep).float()
    for row in mask:
        if not row.any():  # an all-zero mask would cut the member off: keep one channel at random
            row[torch.randint(0, size, ())] = 1.0
    return mask / keep


class _Modulated(nn.Module):
    """What an embedded layer holds besides its shared weight: per-member input and output factors.

    in_scale `[M, in]` (trained r), in_mask `[M, in]` (fixed buffer, 0 or 1 / keep), out_scale `[M, out]` (trained
    s), bias `[M, out]`; each may be None (no such factor)."""

    def _modulations(
        self, members: int, bias: torch.Tensor | None, in_scale, out_scale, in_mask, requires_grad: bool
    ) -> None:
        self.members = members
        self.register_parameter(
            "bias", None if bias is None else nn.Parameter(bias.detach().repeat(members, 1), requires_grad)
        )
        self.register_parameter("in_scale", None if in_scale is None else nn.Parameter(in_scale))
        self.register_parameter("out_scale", None if out_scale is None else nn.Parameter(out_scale))
        self.register_buffer("in_mask", in_mask)

    def input_factor(self) -> torch.Tensor | None:
        """Member a's factor on its input channels, `[M, in]` (r_a, times its mask), or None (ones)."""
        factors = [f for f in (self.in_scale, self.in_mask) if f is not None]
        if not factors:
            return None
        return factors[0] if len(factors) == 1 else factors[0] * factors[1]

    def extra_repr(self) -> str:
        parts = [f"members={self.members}"]
        parts += [name for name in ("in_scale", "in_mask", "out_scale", "bias") if getattr(self, name) is not None]
        return ", ".join(parts)


class EmbeddedConv2d(_Modulated):
    """M members of one `nn.Conv2d` sharing its weight: `[batch, M * in, H, W] -> [batch, M * out, H', W']`.

    weight `[out, in / groups, kh, kw]` (shared); member a: conv(x_a o r_a, W) o s_a + b_a, run as one
    convolution over the batch viewed as `[batch * M, in, H, W]`.
    """

    def __init__(self, conv: nn.Conv2d, members: int, in_scale=None, out_scale=None, in_mask=None):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups, self.padding_mode = conv.dilation, conv.groups, conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=conv.weight.requires_grad)
        self._modulations(members, conv.bias, in_scale, out_scale, in_mask, conv.weight.requires_grad)

    def _channels(self, factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return factor.reshape(1, -1, *([1] * (x.ndim - 2)))  # [M, C] -> [1, M * C, 1, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = self.input_factor()
        if factor is not None:
            x = x * self._channels(factor, x)
        per_member = x.unflatten(1, (self.members, self.in_channels)).flatten(0, 1)  # [batch * M, in, H, W]
        if self.padding_mode != "zeros":
            padded = F.pad(per_member, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            y = F.conv2d(padded, self.weight, None, self.stride, 0, self.dilation, self.groups)
        else:
            y = F.conv2d(per_member, self.weight, None, self.stride, self.padding, self.dilation, self.groups)
        y = y.unflatten(0, (-1, self.members)).flatten(1, 2)  # [batch, M * out, H', W'], member-major
        if self.out_scale is not None:
            y = y * self._channels(self.out_scale, y)
        if self.bias is not None:
            y = y + self._channels(self.bias, y)
        return y

    def folded_weight(self) -> torch.Tensor:
        """Every member's own weight diag(r_a) W diag(s_a), `[M, out, in / groups, kh, kw]`."""
        members, out_per_group, in_per_group = self.members, self.out_channels // self.groups, self.weight.shape[1]
        weight = self.weight.detach().unsqueeze(0).expand(members, *self.weight.shape)
        factor = self.input_factor()
        if factor is not None:  # output channel o of group g reads input channels g * in_per_group + i
            per_weight = factor.detach().view(members, self.groups, 1, in_per_group)
            per_weight = per_weight.expand(members, self.groups, out_per_group, in_per_group)
            weight = weight * per_weight.reshape(members, self.out_channels, in_per_group, 1, 1)
        if self.out_scale is not None:
            weight = weight * self.out_scale.detach().view(members, self.out_channels, 1, 1, 1)
        return weight.contiguous()

    def to_fused(self) -> FusedConv2d:
        """The same M members as the fusion pass's grouped convolution with per-member weights."""
        weights = self.folded_weight()
        convs = []
        for a in range(self.members):
            with torch.device("meta"):  # no init drawn: the weights are set just below
                conv = nn.Conv2d(
                    self.in_channels,
                    self.out_channels,
                    self.kernel_size,
                    self.stride,
                    self.padding,
                    self.dilation,
                    self.groups,
                    self.bias is not None,
                    self.padding_mode,
                )
            conv.weight = nn.Parameter(weights[a])
            if self.bias is not None:
                conv.bias = nn.Parameter(self.bias.detach()[a])
            convs.append(conv)
        return FusedConv2d(convs)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, " + super().extra_repr()
        )


class EmbeddedLinear(_Modulated):
    """M members of one `nn.Linear` sharing its weight: `[..., M * in] -> [..., M * out]`.

    weight `[out, in]` (shared); member a: ((x_a o r_a) W^T) o s_a + b_a, as one matmul over `[..., M, in]`.
    """

    def __init__(self, linear: nn.Linear, members: int, in_scale=None, out_scale=None, in_mask=None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=linear.weight.requires_grad)
        self._modulations(members, linear.bias, in_scale, out_scale, in_mask, linear.weight.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = self.input_factor()
        if factor is not None:
            x = x * factor.flatten()
        y = F.linear(x.unflatten(-1, (self.members, self.in_features)), self.weight)  # [..., M, out]
        if self.out_scale is not None:
            y = y * self.out_scale
        if self.bias is not None:
            y = y + self.bias
        return y.flatten(-2)

    def folded_weight(self) -> torch.Tensor:
        """Every member's own weight, `[M, out, in]`."""
        weight = self.weight.detach().unsqueeze(0).expand(self.members, *self.weight.shape)
        factor = self.input_factor()
        if factor is not None:
            weight = weight * factor.detach().unsqueeze(1)
        if self.out_scale is not None:
            weight = weight * self.out_scale.detach().unsqueeze(2)
        return weight.contiguous()

    def to_fused(self) -> FusedLinear:
        weights = self.folded_weight()
        linears = []
        for a in range(self.members):
            with torch.device("meta"):
                linear = nn.Linear(self.in_features, self.out_features, self.bias is not None)
            linear.weight = nn.Parameter(weights[a])
            if self.bias is not None:
                linear.bias = nn.Parameter(self.bias.detach()[a])
            linears.append(linear)
        return FusedLinear(linears)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()


def _embedder(structure: str, members: int, first: nn.Module, init: str, keep_prob: float):
    """The fusion-pass rule turning M references to one Conv2d / Linear into its embedded layer."""

    def rule(modules: Sequence[nn.Module], _fuse_child) -> nn.Module:
        layer = modules[0]
        kind = EmbeddedConv2d if isinstance(layer, nn.Conv2d) else EmbeddedLinear
        size_in = layer.in_channels if kind is EmbeddedConv2d else layer.in_features
        size_out = layer.out_channels if kind is EmbeddedConv2d else layer.out_features
        if structure == "batchensemble":
            return kind(
                layer,
                members,
                in_scale=_draw_modulation(members, size_in, init),
                out_scale=_draw_modulation(members, size_out, init),
            )
        mask = None if layer is first else _draw_mask(members, size_in, keep_prob)
        return kind(layer, members, in_mask=mask)

    return rule


def embed_member(
    member: nn.Module,
    members: int,
    structure: str,
    init: str = "random_sign",
    keep_prob: float = 0.8,
    example: torch.Tensor | None = None,
) -> nn.Module:
    """One plain member -> M embedded members in one module (`[batch, M * C, ...] -> [batch, M * classes]`).

    `structure` "batchensemble": every Conv2d / Linear gets trained r, s drawn by `init` (random_sign:
    +-1; normal: N(1, 0.5)); "mc_dropout": every Conv2d / Linear but the first in the module tree gets
    a fixed mask on its input channels (Bernoulli(`keep_prob`), kept ones scaled by 1 / keep_prob).
    Every member starts from the member's weights and biases; normalization layers become per-member
    ones. With `example`, checks in eval mode that the module computes what the folded members
    (`folded_copies`) compute.
    """
    if structure not in EMBEDDED:
        raise ValueError(f"ensemble.structure: expected one of {', '.join(EMBEDDED)}, got {structure!r}")
    first = next((m for m in member.modules() if type(m) in (nn.Conv2d, nn.Linear)), None)
    rule = _embedder(structure, members, first, init, keep_prob)
    body = fuse_members([member] * members, rules={nn.Conv2d: rule, nn.Linear: rule})
    if example is not None:
        check_fused(body, folded_copies(member, body), example)
    return body


def fold_embedded(body: nn.Module) -> nn.Module:
    """An embedded module -> the fusion pass's module of the same M members with per-member weights
    (the state dict of `fuse_members` over M plain copies); the embedded module is left as it is."""
    folded = copy.deepcopy(body)
    for name, module in list(folded.named_modules()):
        if isinstance(module, (EmbeddedConv2d, EmbeddedLinear)):
            parent, _, child = name.rpartition(".")
            folded.get_submodule(parent)._modules[child] = module.to_fused()
    return folded


def folded_copies(template: nn.Module, body: nn.Module) -> list[nn.Module]:
    """The M members of an embedded `body` as M plain modules of `template`'s architecture, member a
    holding diag(r_a) W diag(s_a), its own bias and its own normalization statistics."""
    state = fold_embedded(body).state_dict()
    members = []
    for index in range(_members_of(body)):
        plain = copy.deepcopy(template)
        plain.load_state_dict({key: value[index] for key, value in state.items()})
        members.append(plain.train(body.training))
    return members


def _members_of(body: nn.Module) -> int:
    for module in body.modules():
        if isinstance(module, (EmbeddedConv2d, EmbeddedLinear)):
            return module.members
    raise ValueError("not an embedded ensemble: it has no embedded layer")
