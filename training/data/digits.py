"""scikit-learn's bundled 8x8 digits: `[1, 8, 8]` floats 0..16, the fixed 70 / 10 / 20 split, in memory."""

from __future__ import annotations

import torch

from training.config import DataConfig
from training.data._base import IMAGE_SPECS, INPUT_SPACES, Dataset, Split, channel_stats
from training.splits import digits_split

__all__ = ["load_digits_dataset"]


def load_digits_dataset(config: DataConfig, for_training: bool = True) -> Dataset:
    """The digits split by `config.split_seed` (`training.splits.digits_split`)."""
    splits = {
        name: Split(torch.from_numpy(x), torch.from_numpy(y))
        for name, (x, y) in digits_split(config.split_seed).items()
    }
    mean, std = channel_stats(splits["train"].x)
    return Dataset(
        "digits",
        tuple(str(c) for c in range(10)),
        (1, 8, 8),
        mean,
        std,
        splits["train"],
        splits["val"],
        splits["test"],
        augment=False,
        image=IMAGE_SPECS["digits"],
        input_space=INPUT_SPACES["digits"],
    )
