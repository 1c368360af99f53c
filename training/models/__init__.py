"""Model builders: M ensemble members as ONE fused module (`Ensemble`), by architecture name."""

from __future__ import annotations

from collections.abc import Sequence

from training.models.builtin import BUILTIN, build_builtin
from training.models.ensemble import Ensemble, member_state_dict

__all__ = ["ARCHITECTURES", "Ensemble", "build_ensemble", "member_state_dict"]

ARCHITECTURES = BUILTIN


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
    if arch not in ARCHITECTURES:
        raise ValueError(f"model.arch: expected one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    return Ensemble(
        build_builtin(arch, members, input_shape, classes, width, depth), members, input_shape, classes, mean, std
    )
