"""What one ensemble member is: a built-in architecture, any torchvision classifier, or a user's
own `nn.Module` from a factory function; optionally started from saved weights.

`model.arch` names it: `mlp | cnn | resnet18 | preact_resnet18`, `torchvision:NAME` (a builder
of `torchvision.models.list_models(module=torchvision.models)`, built with `num_classes` from the
data and `model.kwargs`; nothing is downloaded), or `factory` with `model.factory =
"package.module:function"`, called as `function(num_classes, **kwargs) -> nn.Module`.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from forde_serve.errors import FordeError
from training.config import FACTORY, TORCHVISION, check_model
from training.models.builtin import BUILTIN, build_builtin

__all__ = [
    "CHECKED_TORCHVISION",
    "ModelError",
    "build_member",
    "classifier_keys",
    "classes_in",
    "load_initial_weights",
    "match_state",
    "read_state_dict",
]


# torchvision classifiers the tests check end to end (fused == separate copies in forward, input
# gradients, a FoRDE step and batch-norm statistics; export validated): a meta-test fails when one
# of them has no test.
CHECKED_TORCHVISION = (
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "regnet_y_400mf",
    "convnext_tiny",
)


class ModelError(FordeError, ValueError):
    """A model that cannot be built as asked, or weights that do not fit it; names the field or file and key."""


def _factory_function(spec: str) -> Callable[..., nn.Module]:
    module_name, _, function_name = spec.partition(":")
    if os.getcwd() not in sys.path:  # as `uvicorn module:app` does: a module in the current folder is found
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelError(f"model.factory {spec!r}: cannot import {module_name!r} ({err})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ModelError(f"model.factory {spec!r}: {module_name} has no function {function_name!r}")
    return function


def build_member(
    arch: str,
    input_shape: Sequence[int],
    classes: int,
    width: int = 32,
    depth: int = 2,
    kwargs: Mapping[str, Any] | None = None,
    factory: str | None = None,
) -> nn.Module:
    """One plain member, freshly initialised: `[batch, *input_shape]` -> logits `[batch, classes]`."""
    kwargs = dict(kwargs or {})
    check_model(arch, kwargs, factory)
    if arch in BUILTIN:
        return build_builtin(arch, input_shape, classes, width, depth)
    if arch == FACTORY:
        where, build = f"model.factory {factory!r}", _factory_function(factory)
    else:
        import torchvision.models

        name = arch[len(TORCHVISION) :]
        where, build = f"torchvision {name}", torchvision.models.get_model_builder(name)
    try:
        member = build(num_classes=classes, **kwargs)
    except (TypeError, ValueError) as err:
        raise ModelError(f"model.kwargs: {where} refused num_classes={classes} and {kwargs}: {err}") from None
    if not isinstance(member, nn.Module):
        raise ModelError(f"{where}: expected it to return an nn.Module, got {type(member).__name__}")
    return member


def read_state_dict(path: str | Path, field: str = "model.init") -> dict[str, torch.Tensor]:
    """A plain member's weights from `.safetensors`, or a `.pt`/`.pth` state dict (read without pickle's
    code execution: `torch.load(..., weights_only=True)`)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{field}: {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ModelError(f"{field}: {path} is not a readable safetensors file ({err})") from None
    if path.suffix not in (".pt", ".pth"):
        raise ModelError(f"{field}: expected a .safetensors, .pt or .pth file of weights, got {path.name!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own text is paragraphs (with terminal escapes) on loading it unsafely: not advice to pass on
        raise ModelError(
            f"{field}: {path} holds pickled objects other than tensors (a whole model saved with torch.save(model), "
            "or an optimizer), which are not read because unpickling them can run any code; save the weights with "
            "torch.save(model.state_dict(), path) and give that file"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        reason = str(err).strip().splitlines()[0].rstrip(". ") if str(err).strip() else type(err).__name__
        raise ModelError(
            f"{field}: {path} is not a state dict torch.load(weights_only=True) can read ({reason}); "
            "save weights with torch.save(model.state_dict(), path)"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        got = f"a dict with keys {sorted(state)[:5]}" if isinstance(state, Mapping) else type(state).__name__
        raise ModelError(
            f"{field}: {path} holds {got}, expected a state dict (parameter name -> tensor): "
            "save weights with torch.save(model.state_dict(), path)"
        )
    return dict(state)


def classifier_keys(build: Callable[[int], nn.Module]) -> dict[str, int]:
    """The state-dict keys whose shape follows the class count -> the dimension that carries it.

    `build(classes)` is called twice (on the meta device: no memory, no random numbers drawn) with
    different class counts, and the keys whose shapes differ are the classifier's.
    """
    shapes = []
    for classes in (7, 11):
        with torch.device("meta"):
            shapes.append({k: tuple(v.shape) for k, v in build(classes).state_dict().items()})
    keys = {}
    for key, shape in shapes[0].items():
        other = shapes[1][key]
        if shape != other:
            keys[key] = next(d for d, (a, b) in enumerate(zip(shape, other, strict=True)) if a != b)
    if not keys:
        raise ModelError("model: no weight depends on the class count, so the classifier head cannot be found")
    return keys


def classes_in(state: Mapping[str, torch.Tensor], heads: Mapping[str, int], path: str | Path, what: str) -> int:
    """The class count `state`'s classifier weights (`heads`, from `classifier_keys`) were made for."""
    key, dim = next(iter(heads.items()))
    if key not in state:
        raise ModelError(f"{path}: has no {key!r}, the classifier weight of {what} (weights of another architecture?)")
    return int(state[key].shape[dim])


def match_state(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    path: str | Path,
    what: str,
    heads: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """The entries of `state` (read from `path`) to load into a member whose state dict is `expected`.

    Every key must be there with its shape, except the classifier's (`heads`) when its class count
    differs: those are left out (the member keeps its fresh head). Otherwise raises ModelError
    naming the file and the first key that does not fit `what`.
    """
    heads = heads or {}
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ModelError(f"{path}: key {unexpected[0]!r} is not a weight of {what} (weights of another architecture?)")
    # Batch norm's batch counter is absent from older files; the member keeps its own (as PyTorch does).
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ModelError(f"{path}: key {missing[0]!r} of {what} is missing")
    loadable = {}
    for key in expected:  # in the model's order, so the first mismatch named is the earliest layer
        if key not in state:
            continue
        value, want = state[key], tuple(expected[key].shape)
        if tuple(value.shape) == want:
            loadable[key] = value
        elif key in heads and len(value.shape) == len(want):
            dim = heads[key]
            if any(a != b for d, (a, b) in enumerate(zip(value.shape, want, strict=True)) if d != dim):
                raise ModelError(f"{path}: key {key!r} has shape {list(value.shape)}, {what} expects {list(want)}")
        else:
            raise ModelError(f"{path}: key {key!r} has shape {list(value.shape)}, {what} expects {list(want)}")
    return loadable


def load_initial_weights(members: Sequence[nn.Module], path: str | Path, heads: Mapping[str, int], what: str) -> None:
    """Start every member from the weights in `path`; a classifier made for another class count is not
    loaded, so each member keeps its own fresh head."""
    state = read_state_dict(path)
    loadable = match_state(state, members[0].state_dict(), path, what, heads)
    with torch.no_grad():
        for member in members:
            member.load_state_dict(loadable, strict=False)
