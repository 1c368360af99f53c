"""Datasets as in-memory tensors in their raw input space (the space the exported model accepts).

- digits: scikit-learn's bundled 8x8 handwritten digits, `[1, 8, 8]` floats 0..16, with a fixed
  stratified train / validation / test split (70 / 10 / 20).
- cifar10 / cifar100: RGB floats in [0, 1], `[3, 32, 32]`, read from a local folder in
  torchvision's on-disk layout; never downloaded. 5000 training images are held out (fixed by
  `split_seed`) as the validation split.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from forde_serve.errors import FordeError
from training.config import DataConfig

__all__ = [
    "IMAGE_SPECS",
    "INPUT_SPACES",
    "Dataset",
    "DatasetError",
    "augment_batch",
    "load_corrupted_cifar",
    "load_dataset",
]

_CIFAR_VALIDATION = 5000


class DatasetError(FordeError, ValueError):
    """A dataset folder that is missing or not in the expected layout."""


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # [N, *input_shape] float32, raw input space
    y: torch.Tensor  # [N] int64


# How an uploaded picture becomes a raw input: PIL mode, [height, width], multiply 0..255 by
# scale, and invert first (digits are bright ink on black; photographed digits are dark on light).
IMAGE_SPECS = {
    "digits": {"mode": "L", "size": [8, 8], "scale": 16 / 255, "invert": True},
    "cifar10": {"mode": "RGB", "size": [32, 32], "scale": 1 / 255, "invert": False},
    "cifar100": {"mode": "RGB", "size": [32, 32], "scale": 1 / 255, "invert": False},
}

# What one raw input is, in words (the exported file's `input_space`).
INPUT_SPACES = {
    "digits": "scikit-learn load_digits().images as float32 [1, 8, 8], pixel counts 0 to 16",
    "cifar10": "RGB floats in [0, 1] as float32 [3, 32, 32] (channels first)",
    "cifar100": "RGB floats in [0, 1] as float32 [3, 32, 32] (channels first)",
}


@dataclass(frozen=True)
class Dataset:
    name: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]  # per channel, of the training split
    std: tuple[float, ...]
    train: Split
    val: Split
    test: Split
    augment: bool  # random crop (padding 4) + horizontal flip on training batches

    @property
    def image(self) -> dict | None:
        """How an uploaded picture becomes one raw input (None: the inputs are not pictures)."""
        return IMAGE_SPECS.get(self.name)

    @property
    def input_space(self) -> str:
        """What one raw input is, in words."""
        return INPUT_SPACES[self.name]


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    per_channel = x.transpose(0, 1).flatten(1).double()
    return tuple(per_channel.mean(1).tolist()), tuple(per_channel.std(1).clamp_min(1e-6).tolist())


def _split_indices(labels: np.ndarray, fractions: tuple[float, float], seed: int):
    """Stratified split into train / validation / test index arrays, fixed by `seed`."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    val_fraction, test_fraction = fractions
    rest, test = train_test_split(index, test_size=test_fraction, stratify=labels, random_state=seed)
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), stratify=labels[rest], random_state=seed
    )
    return np.sort(train), np.sort(val), np.sort(test)


def _digits(config: DataConfig) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1)  # [N, 1, 8, 8], 0..16
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train, val, test = _split_indices(bunch.target, (0.1, 0.2), config.split_seed)
    mean, std = _channel_stats(x[train])
    return Dataset(
        "digits",
        tuple(str(c) for c in bunch.target_names),
        (1, 8, 8),
        mean,
        std,
        Split(x[train], y[train]),
        Split(x[val], y[val]),
        Split(x[test], y[test]),
        augment=False,
    )


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR's python version is pickled dicts of numpy arrays: allow exactly that, nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }  # how protocol-2 pickles written by Python 3 carry bytes

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch file")
        return super().find_class(module, name)


def _read_batch(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"missing CIFAR file {path}")
    try:
        with path.open("rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DatasetError(f"{path} is not a CIFAR batch file in torchvision's python format: {err}") from None


_CIFAR_LAYOUT = {
    # name: (folder, train files, test file, meta file, label key, class-names key)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
}


def _cifar_folder(name: str, root: Path) -> Path:
    folder_name = _CIFAR_LAYOUT[name][0]
    for candidate in (root / folder_name, root):
        if (candidate / _CIFAR_LAYOUT[name][2]).is_file():
            return candidate
    raise DatasetError(
        f"{name} not found under {str(root)!r}: put torchvision's '{folder_name}' folder there "
        f"(the python version of the dataset, extracted), e.g. {root / folder_name / _CIFAR_LAYOUT[name][2]}; "
        "nothing is downloaded at run time"
    )


def _cifar(config: DataConfig) -> Dataset:
    folder = _cifar_folder(config.dataset, Path(config.root).expanduser())
    _, train_files, test_file, meta_file, label_key, names_key = _CIFAR_LAYOUT[config.dataset]

    def images_and_labels(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batches = [_read_batch(folder / f) for f in files]
        try:
            data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
            labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        except KeyError as err:
            raise DatasetError(f"CIFAR batch file in {folder} lacks the key {err}") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise DatasetError(
                f"CIFAR data in {folder}: expected [N, 3072] images with N labels, "
                f"got {list(data.shape)} images and {len(labels)} labels"
            )
        x = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
        return x, torch.from_numpy(labels)

    x, y = images_and_labels(train_files)
    test_x, test_y = images_and_labels([test_file])
    class_names = tuple(_read_batch(folder / meta_file).get(names_key, []))
    held_out = min(_CIFAR_VALIDATION, len(x) // 10)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(config.split_seed))
    val_index, train_index = order[:held_out].sort().values, order[held_out:].sort().values
    mean, std = _channel_stats(x[train_index])
    return Dataset(
        config.dataset,
        class_names,
        (3, 32, 32),
        mean,
        std,
        Split(x[train_index], y[train_index]),
        Split(x[val_index], y[val_index]),
        Split(test_x, test_y),
        augment=config.augment,
    )


def load_dataset(config: DataConfig) -> Dataset:
    """Load the configured dataset into memory (raw input space)."""
    return _digits(config) if config.dataset == "digits" else _cifar(config)


_CIFAR_C_FOLDER = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}


def load_corrupted_cifar(name: str, root: str | Path, per_severity: int | None = None):
    """CIFAR-10-C / CIFAR-100-C in their published layout, as (corruption, severity, x, y) per set.

    The folder (`root/CIFAR-10-C` or `root` itself) holds `labels.npy` and one `<corruption>.npy`
    per corruption type: uint8 `[5 * n, 32, 32, 3]`, severities 1 to 5 one after another. Arrays
    are memory-mapped; `per_severity` keeps the first that many images of each severity. Yields
    raw inputs float32 `[n, 3, 32, 32]` in [0, 1] and labels int64 `[n]`.
    """
    root = Path(root).expanduser()
    folder = next((c for c in (root / _CIFAR_C_FOLDER[name], root) if (c / "labels.npy").is_file()), None)
    if folder is None:
        raise DatasetError(
            f"{_CIFAR_C_FOLDER[name]} not found under {str(root)!r}: put the published folder "
            f"there (labels.npy and one <corruption>.npy per corruption); nothing is downloaded"
        )
    labels = np.load(folder / "labels.npy")
    files = sorted(p for p in folder.glob("*.npy") if p.name != "labels.npy")
    if not files:
        raise DatasetError(f"{folder}: expected one <corruption>.npy per corruption beside labels.npy, found none")
    if labels.ndim != 1 or len(labels) % 5:
        raise DatasetError(f"{folder / 'labels.npy'}: expected [5 * n] labels (5 severities), got {list(labels.shape)}")
    n = len(labels) // 5
    keep = n if per_severity is None else min(per_severity, n)
    for path in files:
        images = np.load(path, mmap_mode="r")
        if images.shape != (len(labels), 32, 32, 3) or images.dtype != np.uint8:
            raise DatasetError(
                f"{path}: expected uint8 [{len(labels)}, 32, 32, 3] like labels.npy, "
                f"got {images.dtype} {list(images.shape)}"
            )
        for severity in range(1, 6):
            rows = slice((severity - 1) * n, (severity - 1) * n + keep)
            x = np.asarray(images[rows], dtype=np.float32).transpose(0, 3, 1, 2) / 255.0
            yield path.stem, severity, np.ascontiguousarray(x), labels[rows].astype(np.int64)


def augment_batch(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per image, on `[B, C, H, W]`."""
    batch, channels, height, width = x.shape
    padded = F.pad(x, (padding,) * 4)
    offset_y = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(x.device)
    offset_x = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(x.device)
    rows = (offset_y[:, None] + torch.arange(height, device=x.device))[:, None, :, None]
    cols = (offset_x[:, None] + torch.arange(width, device=x.device))[:, None, None, :]
    crops = padded[
        torch.arange(batch, device=x.device)[:, None, None, None],
        torch.arange(channels, device=x.device)[None, :, None, None],
        rows,
        cols,
    ]
    flip = (torch.rand(batch, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)
