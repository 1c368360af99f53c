"""Model builders: M ensemble members as ONE fused module (`Ensemble`).

A member is a plain `nn.Module` (a built-in architecture, a torchvision classifier or a user's
factory, `training.models.members`); M copies of it are fused by one pass (`training.models.fuse`),
or, for an embedded ensemble, one copy's layers are shared by M modulated members
(`training.models.embedded`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.config import EmbeddedConfig
from training.models.builtin import BUILTIN, draw_as_fused_layers_did
from training.models.embedded import EMBEDDED, embed_member, fold_embedded
from training.models.ensemble import Ensemble, member_state_dict, parameter_count
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
    "folded_ensemble",
    "member_state_dict",
    "parameter_count",
]

ARCHITECTURES = BUILTIN


def _example(input_shape: Sequence[int], like: nn.Module | None) -> torch.Tensor:
    """A fixed random plain input batch `[2, *input_shape]` on `like`'s device and dtype."""
    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    reference = None if like is None else next(like.parameters(), None)
    return example if reference is None else example.to(reference.device, reference.dtype)


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
    body = fuse_members(copies, _example(input_shape, copies[0] if copies else None))
    return Ensemble(body, len(copies), input_shape, classes, mean, std)


def folded_ensemble(ensemble: Ensemble) -> Ensemble:
    """An embedded ensemble as independent members with per-member weights W_a = diag(r_a) W diag(s_a):
    the same function, as the fusion pass's body (the grouped "folded" layout); independent: itself."""
    if ensemble.structure == "independent":
        return ensemble
    folded = Ensemble(
        fold_embedded(ensemble.body),
        ensemble.members,
        ensemble.input_shape,
        ensemble.classes,
        ensemble.mean.flatten().tolist(),
        ensemble.std.flatten().tolist(),
    )
    folded.mean.copy_(ensemble.mean)  # bit for bit, not through a float round trip
    folded.std.copy_(ensemble.std)
    return folded.train(ensemble.training)


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
    structure: str = "independent",
    embedded: EmbeddedConfig | None = None,
) -> Ensemble:
    """Build M fresh members (`training.models.members.build_member`) and fuse them.

    `init`: a plain member's weights (.safetensors, or a .pt/.pth state dict) every member starts
    from; a classifier made for another class count is left out, so each member keeps its own head.
    `structure` batchensemble / mc_dropout: ONE member is built and its layers shared by M modulated
    members (`embedded`: how the modulations start, the mask's keep probability).
    """
    if structure in EMBEDDED:
        return _embedded_ensemble(
            arch, members, input_shape, classes, mean, std, width, depth, kwargs, factory, init, structure, embedded
        )
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


def _embedded_ensemble(
    arch, members, input_shape, classes, mean, std, width, depth, kwargs, factory, init, structure, embedded
) -> Ensemble:
    embedded = embedded or EmbeddedConfig()
    member = build_member(arch, input_shape, classes, width, depth, kwargs, factory)
    if init is not None:
        heads = classifier_keys(lambda n: build_member(arch, input_shape, n, width, depth, kwargs, factory))
        load_initial_weights([member], init, heads, arch if arch != "factory" else f"model.factory {factory!r}")
    body = embed_member(
        member, members, structure, embedded.init, embedded.keep_prob, example=_example(input_shape, member)
    )
    return Ensemble(body, members, input_shape, classes, mean, std, structure=structure)
