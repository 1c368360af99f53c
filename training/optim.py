"""The optimizer: SGD with Nesterov momentum, weight decay as the Gaussian prior, and, for embedded
ensembles, the step of docs/design.md section 11.

The loss is sum_a L_a (+ R), so plain SGD gives every parameter the sum of the member gradients. An
embedded ensemble's shared weights W must step by lr * gamma(M) / M * sum_a dL_a/dW with the prior at
full strength: their group runs at lr * g with weight decay wd / g (g = gamma(M) / M), which is exactly
SGD on g * gradient + wd * W, momentum included (every term of the update is linear in it). The
modulations (r, s) step by their own gradient at lr * `modulation_lr_ratio`, without weight decay;
per-member biases and normalization parameters as independent members' parameters do.
"""

from __future__ import annotations

import torch
from torch import nn

from training.config import TrainConfig
from training.models.embedded import EmbeddedConv2d, EmbeddedLinear

__all__ = ["build_optimizer", "parameter_groups", "set_learning_rate"]


def parameter_groups(ensemble: nn.Module, config: TrainConfig) -> list[dict]:
    """SGD parameter groups, each with `lr_scale` (its learning rate / optim.lr): shared weights,
    modulations, then everything else; groups with no parameters are left out."""
    weight_decay = config.optim.weight_decay
    if config.ensemble.structure == "independent":
        return [{"params": list(ensemble.parameters()), "lr_scale": 1.0, "weight_decay": weight_decay}]
    embedded = config.embedded
    members = config.ensemble.members
    gamma = members if embedded.shared_grad_scale == "M" else 1
    share = gamma / members
    shared, modulations = [], []
    for module in ensemble.modules():
        if isinstance(module, (EmbeddedConv2d, EmbeddedLinear)):
            shared.append(module.weight)
            modulations += [p for p in (module.in_scale, module.out_scale) if p is not None]
    taken = {id(p) for p in (*shared, *modulations)}
    own = [p for p in ensemble.parameters() if id(p) not in taken]
    groups = [
        {"params": shared, "lr_scale": share, "weight_decay": weight_decay / share},
        {"params": modulations, "lr_scale": embedded.modulation_lr_ratio, "weight_decay": 0.0},
        {"params": own, "lr_scale": 1.0, "weight_decay": weight_decay},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(ensemble: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    optim = config.optim
    groups = parameter_groups(ensemble, config)
    for group in groups:
        group["lr"] = optim.lr * group["lr_scale"]
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's learning rate `lr`, times each group's `lr_scale`."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
