"""Model builders: M ensemble members as ONE fused module (`Ensemble`).

A member is a plain `nn.Module` (a built-in architecture, a torchvision classifier or a user's
factory, `training.models.members`); M copies of it are fused by one pass (`training.models.fuse`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.models.builtin import BUILTIN, draw_as_fused_layers_did
from training.models.ensemble import Ensemble, member_state_dict
from training.models.fuse import FusionError, fuse_members
from training.models.members import (
    ModelError,
    build_member,
    classifier_keys,
    load_initial_weights,
)

__all__ = [
    "ARCHITECTURES",
    "Ensemble",
    "FusionError",
    "ModelError",
    "build_ensemble",
    "build_member",
    "ensemble_of",
    "member_state_dict",
]

ARCHITECTURES = BUILTIN


def ensemble_of(
    copies: Sequence[nn.Module],
    input_shape: Sequence[int],
    classes: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> Ensemble:
    """Fuse M plain members (same architecture, any weights) into an Ensemble over raw inputs.

    Checks on a random input that the fused module computes what the members compute (FusionError
    naming the module that mixes members if not); the members are left as they are.
    """
    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    reference = next(copies[0].parameters(), None) if copies else None
    if reference is not None:
        example = example.to(reference.device, reference.dtype)
    body = fuse_members(copies, example)
    return Ensemble(body, len(copies), input_shape, classes, mean, std)


def build_ensemble(
    arch: str,
    members: int,
    input_shape: Sequence[int],
    classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: int = 32,
    depth: int = 2,
    *,
    kwargs: Mapping[str, Any] | None = None,
    factory: str | None = None,
    init: str | Path | None = None,
) -> Ensemble:
    """Build M fresh members (`training.models.members.build_member`) and fuse them.

    `init`: a plain member's weights (.safetensors, or a .pt/.pth state dict) every member starts
    from; a classifier made for another class count is left out, so each member keeps its own head.
    """
    redraw = arch in BUILTIN and init is None
    start = torch.random.get_rng_state() if redraw else None
    copies = [build_member(arch, input_shape, classes, width, depth, kwargs, factory) for _ in range(members)]
    if init is not None:
        heads = classifier_keys(lambda n: build_member(arch, input_shape, n, width, depth, kwargs, factory))
        load_initial_weights(copies, init, heads, arch if arch != "factory" else f"model.factory {factory!r}")
    ensemble = ensemble_of(copies, input_shape, classes, mean, std)
    if redraw:  # a seed gives the built-in ensemble it gave before the fusion pass existed
        torch.random.set_rng_state(start)
        draw_as_fused_layers_did(ensemble.body)
    return ensemble
