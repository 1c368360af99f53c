"""The fusion pass: M copies of one standard module tree become ONE module that runs them all.

`fuse_members(copies)` walks the copies' common tree and swaps every layer for its fused
equivalent (`training.models.layers`): members travel folded into the channel dimension,
member-major. The fused tree mirrors the original (same attribute names, same state-dict keys,
each per-member tensor stacked `[M, ...]`). Layers that act per channel or per element
(activations, pooling, dropout, flatten) are kept as they are; containers with their own
forward are kept with their children swapped. A module of any other kind is refused, naming
its path and type, before anything trains.

A container's forward may still mix channels across members (a `torch.cat` over channels, a
channel shuffle, a reshape); given an example input, the pass checks that the fused module
computes what the copies compute and names the first module whose own forward does not.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from forde_serve.errors import FordeError
from training.models.layers import (
    FusedBatchNorm,
    FusedCNBlock,
    FusedConv2d,
    FusedGroupNorm,
    FusedLayerNorm,
    FusedLayerNorm2d,
    FusedLinear,
    FusedStochasticDepth,
    TwiceDifferentiableHardsigmoid,
    TwiceDifferentiableHardswish,
)

__all__ = ["SUPPORTED", "FusionError", "check_fused", "fold_members", "fuse_members"]


class FusionError(FordeError, ValueError):
    """A member architecture the fusion pass cannot turn into one module; names the module."""


# Per channel or per element, so each member's channels stay its own (dropout masks included).
_KEPT: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Hardtanh,
    nn.Softplus,
    nn.Softsign,
    nn.LogSigmoid,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.Flatten,  # from dimension 1 on (checked below): members stay outermost
)


def _stochastic_depth(modules: Sequence[nn.Module], _fuse_child) -> nn.Module:
    return FusedStochasticDepth(len(modules), modules[0].p, modules[0].mode)


def _batch_norm(modules: Sequence[nn.Module], _fuse_child) -> nn.Module:
    counts = {int(m.num_batches_tracked) for m in modules if m.num_batches_tracked is not None}
    if modules[0].momentum is None and len(counts) > 1:
        raise _NotSupported(
            "with momentum=None batch norm averages over its batch count, but the members' "
            f"num_batches_tracked differ ({sorted(counts)}); give it a momentum or equal counts",
            list_supported=False,
        )
    return FusedBatchNorm(modules)


def _layer_norm(modules: Sequence[nn.Module], _fuse_child) -> nn.Module:
    if len(modules[0].normalized_shape) != 1:
        raise _NotSupported("LayerNorm over more than the last dimension mixes members")
    return FusedLayerNorm(modules)


def _cn_block(modules: Sequence[nn.Module], fuse_child) -> nn.Module:
    return FusedCNBlock(
        fuse_child("block"),
        torch.stack([m.layer_scale.detach() for m in modules]),
        fuse_child("stochastic_depth"),
    )


def _rules() -> dict[type[nn.Module], Callable[[Sequence[nn.Module], Callable[[str], nn.Module]], nn.Module]]:
    """Exact type -> how M such modules become one (subclasses may override forward: not matched)."""
    rules = {
        nn.Conv2d: lambda ms, _: FusedConv2d(ms),
        nn.Linear: lambda ms, _: FusedLinear(ms),
        nn.BatchNorm1d: _batch_norm,
        nn.BatchNorm2d: _batch_norm,
        nn.BatchNorm3d: _batch_norm,
        nn.LayerNorm: _layer_norm,
        nn.GroupNorm: lambda ms, _: FusedGroupNorm(ms),
        nn.Hardsigmoid: lambda ms, _: TwiceDifferentiableHardsigmoid(),
        nn.Hardswish: lambda ms, _: TwiceDifferentiableHardswish(),
    }
    if "torchvision" in sys.modules:  # otherwise no torchvision module can be in the tree: skip the import
        from torchvision.models.convnext import CNBlock, LayerNorm2d
        from torchvision.ops import StochasticDepth

        rules |= {
            LayerNorm2d: lambda ms, _: FusedLayerNorm2d(ms),
            StochasticDepth: _stochastic_depth,
            CNBlock: _cn_block,
        }
    return rules


def _kept() -> tuple[type[nn.Module], ...]:
    if "torchvision" not in sys.modules:
        return _KEPT
    from torchvision.ops.misc import Permute

    return (*_KEPT, Permute)


def _name(kind: type) -> str:
    return kind.__qualname__ if kind.__module__.startswith("torch.nn") else f"{kind.__module__}.{kind.__qualname__}"


SUPPORTED = (
    "layers: "
    + ", ".join(
        [
            "Conv2d (any groups, dilation, padding_mode)",
            "Linear",
            "BatchNorm1d/2d/3d",
            "LayerNorm (last dimension)",
            "GroupNorm",
            "torchvision LayerNorm2d, StochasticDepth, Permute, ConvNeXt CNBlock",
            "elementwise activations (ReLU, ReLU6, GELU, SiLU, Mish, Sigmoid, Tanh, LeakyReLU, ELU, CELU, SELU, "
            "Hardtanh, Hardsigmoid, Hardswish, Softplus, Softsign, LogSigmoid, Identity)",
            "MaxPool1d/2d, AvgPool1d/2d, AdaptiveAvgPool1d/2d, AdaptiveMaxPool2d",
            "Dropout, Dropout1d/2d, AlphaDropout",
            "Flatten from dimension 1",
        ]
    )
    + "; and any container without parameters of its own (Sequential, torchvision blocks, your own nn.Module)"
)


class _NotSupported(Exception):
    """Raised inside a rule; turned into a FusionError that names the module."""

    def __init__(self, why: str, list_supported: bool = True):
        super().__init__(why)
        self.list_supported = list_supported


def _refuse(path: str, module: nn.Module, why: str, list_supported: bool = True) -> FusionError:
    where = repr(path) if path else "the model itself"
    supported = f"; supported {SUPPORTED}" if list_supported else ""
    return FusionError(f"model: cannot fuse {where} ({_name(type(module))}): {why}{supported}")


def _own_tensors(module: nn.Module) -> list[str]:
    return [name for name, value in (*module._parameters.items(), *module._buffers.items()) if value is not None]


def _fuse(modules: Sequence[nn.Module], path: str, rules: dict, kept: tuple) -> nn.Module:
    module = modules[0]
    kind = type(module)
    for index, other in enumerate(modules[1:], 1):
        if type(other) is not kind:
            raise FusionError(
                f"model: member {index} differs at {path or 'the top'!r}: {_name(type(other))}, not {_name(kind)}; "
                "fusing needs M copies of the same architecture"
            )

    def fuse_child(name: str) -> nn.Module:
        return _fuse([m._modules[name] for m in modules], f"{path}.{name}" if path else name, rules, kept)

    if kind in rules:
        try:
            return rules[kind](modules, fuse_child)
        except _NotSupported as err:
            raise _refuse(path, module, str(err), err.list_supported) from None
    if kind in kept:
        if kind is nn.Flatten and module.start_dim == 0:
            raise _refuse(path, module, "flattening the batch dimension mixes inputs and members")
        return copy.deepcopy(module)
    if not module._modules and not isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise _refuse(path, module, "not a layer type the fusion pass knows")
    own = _own_tensors(module)
    if own:
        raise _refuse(path, module, f"a container with parameters or buffers of its own ({', '.join(own)})")
    # Keep the container (its forward, its attributes) with every child swapped.
    clone = copy.copy(module)
    clone.__dict__["_modules"] = {
        name: None if child is None else fuse_child(name) for name, child in module._modules.items()
    }
    clone.__dict__["_parameters"] = dict(module._parameters)
    clone.__dict__["_buffers"] = dict(module._buffers)
    clone.__dict__["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    return clone


def fuse_members(
    copies: Sequence[nn.Module],
    example: torch.Tensor | None = None,
    rules: Mapping[type[nn.Module], Callable[[Sequence[nn.Module], Callable[[str], nn.Module]], nn.Module]]
    | None = None,
) -> nn.Module:
    """M separately built copies of the same module tree -> ONE fused module.

    The fused module takes the members folded into dimension 1, member-major (`fold_members`):
    `[batch, M * C, ...]`, and returns `[batch, M * classes]` where a copy returns
    `[batch, classes]`. Member m's plain state dict is `{key: value[m]}` of the fused one.
    With `example` (one plain input batch `[batch, *input_shape]`), checks in eval mode that the
    fused module computes what the copies compute; raises FusionError naming the first module
    whose forward mixes members. The copies are left as they are. `rules` replace the pass's own for
    some exact layer types (the embedding pass, `training.models.embedded`, gives Conv2d and Linear its own).
    """
    if not copies:
        raise FusionError("model: fusing needs at least one member, got none")
    fused = _fuse(list(copies), "", _rules() | dict(rules or {}), _kept())
    fused.train(copies[0].training)
    if example is not None:
        check_fused(fused, copies, example)
    return fused


def fold_members(x: torch.Tensor, members: int) -> torch.Tensor:
    """One plain batch `[batch, C, ...]` as every member's input `[batch, M * C, ...]`, member-major."""
    return x.repeat(1, members, *[1] * (x.ndim - 2))


def _reference(fused: torch.Tensor, plain: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The copies' tensors in the fused layout (members in dimension 1, or the last one), or None."""
    members, shape = len(plain), plain[0].shape
    if fused.ndim != len(shape) or fused.ndim < 2:
        return None
    if fused.shape[1] == members * shape[1] and fused.shape[2:] == shape[2:]:
        return torch.cat(list(plain), dim=1)
    if fused.shape[-1] == members * shape[-1] and fused.shape[:-1] == shape[:-1]:
        return torch.cat(list(plain), dim=-1)
    return None


def _close(fused: torch.Tensor, plain: Sequence[torch.Tensor]) -> bool:
    want = _reference(fused, plain)
    if want is None:
        return False
    scale = float(want.abs().max()) if want.numel() else 0.0
    return bool(torch.allclose(fused, want, rtol=1e-3, atol=1e-4 * max(scale, 1e-3)))


def _record(model: nn.Module) -> tuple[list, list]:
    """Forward hooks recording (path, first input, output) of every call, in the order calls end."""
    calls: list[tuple[str, object, object]] = []
    handles = []
    for name, module in model.named_modules():

        def hook(module, args, output, name=name):
            calls.append((name, args[0] if args else None, output))

        handles.append(module.register_forward_hook(hook))
    return calls, handles


def _first_mixing_module(fused: nn.Module, copies: Sequence[nn.Module], example: torch.Tensor) -> str | None:
    """The first module (in the order calls end) whose input matches the copies' and output does not."""
    fused_calls, handles = _record(fused)
    copy_calls = []
    try:
        fused(fold_members(example, len(copies)))
        for member in copies:
            calls, member_handles = _record(member)
            handles += member_handles
            member(example)
            copy_calls.append(calls)
    finally:
        for handle in handles:
            handle.remove()
    for index, (name, fused_in, fused_out) in enumerate(fused_calls):
        if not isinstance(fused_out, torch.Tensor) or any(len(calls) <= index for calls in copy_calls):
            continue
        plain_in = [calls[index][1] for calls in copy_calls]
        plain_out = [calls[index][2] for calls in copy_calls]
        if not all(isinstance(t, torch.Tensor) for t in plain_out) or _close(fused_out, plain_out):
            continue
        inputs_tensors = isinstance(fused_in, torch.Tensor) and all(isinstance(t, torch.Tensor) for t in plain_in)
        if not inputs_tensors or _close(fused_in, plain_in):
            kind = _name(type(fused.get_submodule(name)))
            return f"{name!r} ({kind})" if name else f"the model itself ({kind})"
    return None


def check_fused(fused: nn.Module, copies: Sequence[nn.Module], example: torch.Tensor) -> None:
    """Raise FusionError unless `fused` computes what `copies` compute on `example` (eval mode)."""
    modes = [m.training for m in (fused, *copies)]
    try:
        for model in (fused, *copies):
            model.eval()
        with torch.no_grad():
            try:
                plain = [member(example) for member in copies]
            except RuntimeError as err:
                raise FusionError(
                    f"model: a member cannot run on inputs of shape {list(example.shape[1:])}: {err}"
                ) from None
            if not all(isinstance(out, torch.Tensor) and out.ndim == 2 for out in plain):
                got = list(plain[0].shape) if isinstance(plain[0], torch.Tensor) else type(plain[0]).__name__
                raise FusionError(f"model: a member must return logits [batch, classes], got {got}")
            try:
                out = fused(fold_members(example, len(copies)))
            except RuntimeError as err:  # e.g. a view to one member's channel count inside a forward
                raise FusionError(
                    f"model: the fused members cannot run ({str(err).splitlines()[0]}): a forward in this "
                    "architecture assumes one member's channel count, so it cannot be fused"
                ) from None
            if _close(out, plain):
                return
            culprit = _first_mixing_module(fused, copies, example)
    finally:
        for model, mode in zip((fused, *copies), modes, strict=True):
            model.train(mode)
    where = f"the first module that does is {culprit}" if culprit else "no single module could be named"
    raise FusionError(
        "model: the fused members do not compute what separate copies compute, so this architecture's "
        f"forward mixes channels across members (torch.cat over channels, a channel shuffle, a reshape); "
        f"{where}. Such architectures cannot be fused"
    )
