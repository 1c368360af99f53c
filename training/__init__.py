"""Everything that needs torch: members, data, FoRDE, the trainer, evaluation, the exporter.

`training` may import `forde_serve`; `forde_serve` never imports `training`. The names below are
imported on first use, so that `training.cli` (the `forde` commands) loads without torch.
"""

from __future__ import annotations

import importlib

__all__ = ["ConfigError", "TrainConfig", "load_config", "repulsion_term", "train", "with_overrides"]

_HOME = {
    "ConfigError": "training.config",
    "TrainConfig": "training.config",
    "load_config": "training.config",
    "with_overrides": "training.config",
    "repulsion_term": "training.forde",
    "train": "training.trainer",
}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")
