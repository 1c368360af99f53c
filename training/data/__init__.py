"""Datasets in their raw input space (the space the exported model accepts), by name (`DATASETS`).

- digits: scikit-learn's bundled 8x8 handwritten digits, `[1, 8, 8]` floats 0..16, with a fixed
  stratified train / validation / test split (70 / 10 / 20). In memory.
- cifar10 / cifar100: RGB floats in [0, 1], `[3, 32, 32]`, read from a local folder in
  torchvision's on-disk layout; never downloaded. 5000 training images are held out (fixed by
  `split_seed`) as the validation split. In memory.
- imagefolder: the user's own pictures (torchvision's ImageFolder layout), RGB floats in [0, 1]
  as `[3, S, S]`, streamed for training.

Training batches come from `Dataset.train_batches`, the one place that turns the checkpointed
generator into an epoch's batches, so a resumed run draws exactly what an uninterrupted one does.
"""

from __future__ import annotations

from collections.abc import Callable

from training.config import DATASET_NAMES, DataConfig
from training.data._base import IMAGE_SPECS, INPUT_SPACES, Dataset, DatasetError, Split, augment_batch
from training.data.cifar import load_cifar_dataset, load_corrupted_cifar
from training.data.digits import load_digits_dataset
from training.data.imagefolder import PICTURE_SUFFIXES, PictureSplit, load_image_folder

__all__ = [
    "DATASETS",
    "IMAGE_SPECS",
    "INPUT_SPACES",
    "PICTURE_SUFFIXES",
    "Dataset",
    "DatasetError",
    "PictureSplit",
    "Split",
    "augment_batch",
    "load_corrupted_cifar",
    "load_dataset",
]

# name -> loader(config, for_training): the datasets `data.dataset` (and `forde evaluate --data`) may name
DATASETS: dict[str, Callable[[DataConfig, bool], Dataset]] = {
    "digits": load_digits_dataset,
    "cifar10": load_cifar_dataset,
    "cifar100": load_cifar_dataset,
    "imagefolder": load_image_folder,
}
assert tuple(DATASETS) == DATASET_NAMES, "training.config.DATASET_NAMES and the loaders must name the same datasets"


def load_dataset(config: DataConfig, *, for_training: bool = True) -> Dataset:
    """Load the configured dataset (raw input space); layout errors are raised here, before any work.

    An image folder is checked in full when `for_training`: every picture is decoded once (an
    unreadable file is named before the first step), which also measures the normalization
    statistics the config does not give, and the validation and test splits are decoded and kept.
    `for_training=False` (export, evaluation: they read only the validation and test splits, and
    the model carries its own normalization) skips that pass; pictures are then decoded when a
    split is first read, and `mean`/`std` are the config's, or None.
    """
    return DATASETS[config.dataset](config, for_training)
