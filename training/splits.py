"""The digits' fixed split, without torch: numpy and scikit-learn only.

`training.data` builds the digits dataset from these indices; tests of the torch-free serving side
and the monitoring benchmarks read the same split here without importing torch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DIGITS_FRACTIONS", "digits_split", "stratified_split"]

DIGITS_FRACTIONS = (0.1, 0.2)  # validation, test: the fixed 70 / 10 / 20 split


def stratified_split(labels: np.ndarray, fractions: tuple[float, float], seed: int):
    """Stratified split into train / validation / test index arrays, fixed by `seed`."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    val_fraction, test_fraction = fractions
    rest, test = train_test_split(index, test_size=test_fraction, stratify=labels, random_state=seed)
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), stratify=labels[rest], random_state=seed
    )
    return np.sort(train), np.sort(val), np.sort(test)


def digits_split(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits as raw inputs `[N, 1, 8, 8]` float32 (0..16) and labels `[N]` int64, per
    split ("train", "val", "test"), exactly as `training.data` splits them for `split_seed`."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None]
    y = bunch.target.astype(np.int64)
    indices = stratified_split(bunch.target, DIGITS_FRACTIONS, seed)
    return {name: (x[rows], y[rows]) for name, rows in zip(("train", "val", "test"), indices, strict=True)}
