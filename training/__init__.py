"""Everything that needs torch: members, data, FoRDE, the trainer, evaluation, the exporter.

`training` may import `forde_serve`; `forde_serve` never imports `training`.
"""

from training.config import ConfigError, TrainConfig, load_config, with_overrides
from training.forde import repulsion_term
from training.trainer import train

__all__ = ["ConfigError", "TrainConfig", "load_config", "repulsion_term", "train", "with_overrides"]
