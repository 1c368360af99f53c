"""An ensemble of M fused members over raw inputs, and one member's weights taken out of it.

The body is the fusion pass's module (`training.models.fuse`): members folded into the channel
dimension, member-major. A training step is one forward/backward for the whole ensemble (no
Python loop over members), and the same module exports to one ONNX graph whose batch axis stays
symbolic (no vmap).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Ensemble", "member_state_dict", "parameter_count"]


class Ensemble(nn.Module):
    """M fused members over raw inputs `[batch, *input_shape]`; normalization is part of the model.

    `body` takes the members folded into dimension 1, `[batch, M * C, ...]`, and returns `[batch, M * classes]`.
    `structure` says how its members are built (`training.config.STRUCTURES`): independent (the fusion
    pass's body) or embedded (batchensemble, mc_dropout: `training.models.embedded`).
    """

    def __init__(
        self,
        body: nn.Module,
        members: int,
        input_shape: Sequence[int],
        classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        structure: str = "independent",
    ):
        super().__init__()
        self.body, self.members, self.classes, self.structure = body, members, classes, structure
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
        return self.body(z.flatten(1, 2)).unflatten(1, (self.members, self.classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw inputs `[batch, *input_shape]` -> member logits `[batch, M, classes]`."""
        z = self.normalize(x)
        return self.forward_members(z.unsqueeze(1).expand(-1, self.members, *z.shape[1:]))


def member_state_dict(ensemble: Ensemble, index: int) -> dict[str, torch.Tensor]:
    """Member `index`'s weights as the state dict of a one-member ensemble of the same architecture
    (independent members: fold an embedded ensemble first, `training.models.folded_ensemble`)."""
    if ensemble.structure != "independent":
        raise ValueError(f"member_state_dict: a {ensemble.structure} ensemble shares its weights; fold it first")
    shared = {"mean", "std"}  # normalization statistics are not per member
    return {
        name: value if name in shared else value[index : index + 1].clone()
        for name, value in ensemble.state_dict().items()
    }


def parameter_count(ensemble: nn.Module) -> int:
    """Distinct trained parameters: a weight shared by the members counts once, fixed masks not at all."""
    return sum(p.numel() for p in ensemble.parameters() if p.requires_grad)
