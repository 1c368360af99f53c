"""CIFAR-10 / CIFAR-100 from a local folder in torchvision's on-disk layout (never downloaded), and
CIFAR-10-C / CIFAR-100-C in their published layout.

RGB floats in [0, 1], `[3, 32, 32]`; 5000 training images are held out (fixed by `split_seed`) as the
validation split. The batch files are pickles: read with an allow-list unpickler (numpy arrays,
dtypes, bytes only), never `pickle.load`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from training.config import DataConfig
from training.data._base import IMAGE_SPECS, INPUT_SPACES, Dataset, DatasetError, Split, channel_stats

__all__ = ["load_cifar_dataset", "load_corrupted_cifar"]

_CIFAR_VALIDATION = 5000


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


def load_cifar_dataset(config: DataConfig, for_training: bool = True) -> Dataset:
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
    mean, std = channel_stats(x[train_index])
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
        image=IMAGE_SPECS[config.dataset],
        input_space=INPUT_SPACES[config.dataset],
    )


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
