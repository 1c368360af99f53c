"""Datasets in their raw input space (the space the exported model accepts).

- digits: scikit-learn's bundled 8x8 handwritten digits, `[1, 8, 8]` floats 0..16, with a fixed
  stratified train / validation / test split (70 / 10 / 20). In memory.
- cifar10 / cifar100: RGB floats in [0, 1], `[3, 32, 32]`, read from a local folder in
  torchvision's on-disk layout; never downloaded. 5000 training images are held out (fixed by
  `split_seed`) as the validation split. In memory.
- imagefolder: the user's own pictures, `root/train/<class>/*.png|jpg|jpeg|webp|bmp`, optional
  `root/val/` and `root/test/` (torchvision's ImageFolder layout), RGB floats in [0, 1] as
  `[3, S, S]`. The training split is streamed: decoded and augmented a batch at a time, so it
  need not fit in memory; the validation and test splits are decoded once, at the evaluation
  transform, and kept.

Training batches come from `Dataset.train_batches`, the one place that turns the checkpointed
generator into an epoch's batches, so a resumed run draws exactly what an uninterrupted one does.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from forde_serve.contract import ImageSpec
from forde_serve.errors import FordeError
from training.config import DataConfig

__all__ = [
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

_CIFAR_VALIDATION = 5000
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # what an image folder's class folders may hold
_VALIDATION_SHARE = 0.1  # of each class, held out when an image folder has no val/
_PCA_PICTURES = 10_000  # at most this many training pictures (a fixed-seed sample) for the FoRDE PCA basis
_DECODE_BATCH = 256  # pictures per decoding batch outside training (statistics, validation, test)


class DatasetError(FordeError, ValueError):
    """A dataset folder that is missing or not in the expected layout."""


@dataclass(frozen=True)
class Split:
    """A split held in memory."""

    x: torch.Tensor  # [N, *input_shape] float32, raw input space
    y: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return len(self.y)


# How an uploaded picture becomes a raw input: PIL mode, [height, width], multiply 0..255 by
# scale, and invert first (digits are bright ink on black; photographed digits are dark on light).
IMAGE_SPECS = {
    "digits": ImageSpec(mode="L", size=(8, 8), scale=16 / 255, invert=True),
    "cifar10": ImageSpec(mode="RGB", size=(32, 32), scale=1 / 255, invert=False),
    "cifar100": ImageSpec(mode="RGB", size=(32, 32), scale=1 / 255, invert=False),
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
    # Per channel, of the training split; None for an image folder loaded with for_training=False
    # and no statistics in its config (export and evaluation do not need them: the model carries its own).
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    train: Split | PictureSplit
    val: Split | PictureSplit
    test: Split | PictureSplit | None  # None: an image folder without test/
    augment: bool  # CIFAR: random crop (padding 4) + flip; imagefolder: random resized crop (+ flip)
    image: ImageSpec | None  # how an uploaded picture becomes one raw input (None: the inputs are not pictures)
    input_space: str  # what one raw input is, in words

    def train_batches(
        self, generator: torch.Generator, batch_size: int, min_rows: int = 2
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of training batches on the CPU: raw inputs `[B, *input_shape]` float32 (augmented
        when `augment`) and labels `[B]`.

        The order is one `randperm` of `generator`; a batch shorter than `min_rows` (the last one) is
        skipped without being decoded. In memory, the augmentation draws from `generator` too. An
        image folder draws one epoch seed from `generator` and augments picture i with a seed derived
        from (epoch seed, i) alone, so batches do not depend on `data.workers` or on how decoding
        processes are scheduled, and a resumed run (the generator state is checkpointed) gets the
        same pictures. Every process of a distributed run draws the same global batches.
        """
        order = torch.randperm(len(self.train), generator=generator)
        starts = [s for s in range(0, len(order), batch_size) if len(order[s : s + batch_size]) >= min_rows]
        if isinstance(self.train, PictureSplit):
            epoch_seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if self.augment else None
            batches = [order[s : s + batch_size] for s in starts]
            pictures = self.train.decoded([b.tolist() for b in batches], epoch_seed)
            for index, x in zip(batches, pictures, strict=True):
                yield x, self.train.y[index]
            return
        for start in starts:
            index = order[start : start + batch_size]
            x = self.train.x[index]
            if self.augment:
                x = augment_batch(x, generator)
            yield x, self.train.y[index]

    def pca_inputs(self) -> torch.Tensor:
        """Raw training inputs for FoRDE's PCA basis `[N, *input_shape]`: the whole training split in
        memory; for an image folder, the pictures at the evaluation transform, at most `_PCA_PICTURES`
        of them (a sample fixed by `split_seed` above that)."""
        if isinstance(self.train, Split):
            return self.train.x
        return self.train.sample_at_eval_transform(_PCA_PICTURES)


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
        image=IMAGE_SPECS["digits"],
        input_space=INPUT_SPACES["digits"],
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
        image=IMAGE_SPECS[config.dataset],
        input_space=INPUT_SPACES[config.dataset],
    )


# --- image folders -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PictureTransforms:
    """How a decoded RGB picture becomes a raw input `[3, S, S]` float32 in [0, 1] (torchvision v2, on PIL
    images, so the serving side's PIL conversion of the evaluation transform is the same arithmetic)."""

    size: int  # S
    resize: int  # shorter side before the centre crop (evaluation)
    crop_scale: tuple[float, float]  # RandomResizedCrop's area range (training)
    flip: bool  # random horizontal flip (training)

    @cached_property
    def evaluation(self):
        from torchvision.transforms import v2

        return v2.Compose(
            [
                v2.Resize(self.resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
                v2.CenterCrop(self.size),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )

    @cached_property
    def training(self):
        from torchvision.transforms import v2

        steps = [v2.RandomResizedCrop(self.size, scale=self.crop_scale, antialias=True)]
        if self.flip:
            steps.append(v2.RandomHorizontalFlip())
        return v2.Compose([*steps, v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])

    def __call__(self, path: Path, seed: int | None) -> tuple[torch.Tensor | None, str | None]:
        """(the raw input, None), or (None, why the file does not decode). `seed` None: the evaluation
        transform; else the training transform with torch's CPU generator seeded by `seed` (v2
        transforms draw from it), restored afterwards so the caller's random state is untouched."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as picture:
                rgb = picture.convert("RGB")  # as torchvision's ImageFolder loader does
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
            return None, f"{path}: expected a readable picture, got a file that does not decode ({err})"
        if seed is None:
            return self.evaluation(rgb), None
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.training(rgb), None


def _picture_seed(epoch_seed: int, index: int) -> int:
    """Picture `index`'s augmentation seed in an epoch: a function of the two numbers alone."""
    return int(np.random.SeedSequence([epoch_seed, index]).generate_state(1, np.uint64)[0])


class _Decoding(torch.utils.data.Dataset):
    """The DataLoader's view of a split: item (position, seed or None) -> (input, error)."""

    def __init__(self, files: tuple[Path, ...], transforms: _PictureTransforms):
        self.files, self.transforms = files, transforms

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int | None]):
        position, seed = item
        return self.transforms(self.files[position], seed)


def _as_list(results: list) -> list:
    return results


class PictureSplit:
    """A split of an image folder: files and labels in memory, pictures decoded when read."""

    def __init__(
        self, files: tuple[Path, ...], y: torch.Tensor, transforms: _PictureTransforms, workers: int, sample_seed: int
    ):
        self.files, self.y = files, y  # y: [N] int64
        self.transforms, self.workers, self.sample_seed = transforms, workers, sample_seed

    def __len__(self) -> int:
        return len(self.y)

    def decoded(self, batches: list[list[int]], epoch_seed: int | None = None) -> Iterator[torch.Tensor]:
        """The pictures at these positions, a batch `[len(batch), 3, S, S]` at a time, in order.

        `epoch_seed` None: the evaluation transform; else the training transform, picture i seeded by
        (epoch_seed, i). Decoded by `workers` processes (0: this one); an unreadable file raises
        DatasetError naming it (errors travel back as values, so the message stays one line).
        """
        items = [[(i, None if epoch_seed is None else _picture_seed(epoch_seed, i)) for i in b] for b in batches]
        loader = torch.utils.data.DataLoader(
            _Decoding(self.files, self.transforms),
            batch_sampler=items,
            collate_fn=_as_list,
            num_workers=self.workers,
        )
        for results in loader:
            errors = [error for _, error in results if error is not None]
            if errors:
                more = f" ({len(errors) - 1} more unreadable file(s) in the same batch)" if len(errors) > 1 else ""
                raise DatasetError(errors[0] + more)
            yield torch.stack([x for x, _ in results])

    def _all(self, positions: list[int]) -> Iterator[torch.Tensor]:
        return self.decoded([positions[s : s + _DECODE_BATCH] for s in range(0, len(positions), _DECODE_BATCH)])

    @cached_property
    def x(self) -> torch.Tensor:
        """Every picture at the evaluation transform `[N, 3, S, S]`, decoded on first use and kept."""
        chunks = list(self._all(list(range(len(self)))))
        return torch.cat(chunks) if chunks else torch.zeros(0, 3, self.transforms.size, self.transforms.size)

    def sample_at_eval_transform(self, limit: int) -> torch.Tensor:
        """At most `limit` pictures at the evaluation transform: all of them, or a sample fixed by `sample_seed`."""
        positions = np.arange(len(self))
        if len(positions) > limit:
            positions = np.sort(np.random.default_rng(self.sample_seed).choice(positions, limit, replace=False))
        return torch.cat(list(self._all(positions.tolist())))

    def channel_statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std (unbiased) of every picture at the evaluation transform, streamed;
        decoding them all also proves every file readable."""
        count, total, squares = 0, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        for x in self._all(list(range(len(self)))):
            values = x.transpose(0, 1).flatten(1).double()
            count += values.shape[1]
            total += values.sum(1)
            squares += values.square().sum(1)
        mean = total / count
        variance = ((squares - count * mean.square()) / max(count - 1, 1)).clamp_min(0.0)
        return tuple(mean.tolist()), tuple(variance.sqrt().clamp_min(1e-6).tolist())


def _class_folders(folder: Path) -> list[str]:
    """Class folder names under a split folder, sorted (torchvision's find_classes), hidden ones left out."""
    from torchvision.datasets.folder import find_classes

    try:
        names, _ = find_classes(folder)
    except FileNotFoundError:
        names = []
    return [n for n in names if not n.startswith(".")]


def _split_files(folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Every picture of a split folder (torchvision's make_dataset order) and its class index; a class
    folder without pictures raises DatasetError naming it (all of them)."""
    from torchvision.datasets.folder import make_dataset

    samples = make_dataset(
        str(folder), {c: i for i, c in enumerate(classes)}, extensions=PICTURE_SUFFIXES, allow_empty=True
    )
    found = {label for _, label in samples}
    empty = [c for i, c in enumerate(classes) if i not in found]
    if empty:
        raise DatasetError(
            f"{folder}: expected at least one picture ({', '.join(PICTURE_SUFFIXES)}) in every class folder, "
            f"found none in {', '.join(repr(c) for c in empty)}"
        )
    return [Path(path) for path, _ in samples], [label for _, label in samples]


def _held_out(labels: list[int], seed: int) -> np.ndarray:
    """Positions of a stratified validation share of `labels`, fixed by `seed`: round(10%) of each class,
    at least one where the class has two pictures or more, never all of them."""
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    held = []
    for label in np.unique(labels_array):
        members = np.flatnonzero(labels_array == label)
        count = min(len(members) - 1, max(1, round(len(members) * _VALIDATION_SHARE)))
        held.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)


def _image_folder(config: DataConfig, for_training: bool) -> Dataset:
    root = Path(config.root).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"data.root: expected an image folder holding train/<class>/ pictures, got {str(root)!r}, "
            "which is not a folder"
        )
    if not (root / "train").is_dir():
        raise DatasetError(
            f"data.root: expected {root / 'train'}/<class>/ folders of pictures "
            f"({', '.join(PICTURE_SUFFIXES)}), but {root} has no train/ folder"
        )
    classes = _class_folders(root / "train")
    if not classes:
        raise DatasetError(f"{root / 'train'}: expected one folder of pictures per class, found no folder")
    splits = {}
    for name in ("train", "val", "test"):
        folder = root / name
        if not folder.is_dir():
            continue
        if name != "train":
            present = _class_folders(folder)
            missing, extra = sorted(set(classes) - set(present)), sorted(set(present) - set(classes))
            if missing or extra:
                problems = ([f"missing {missing}"] if missing else []) + ([f"not in train/: {extra}"] if extra else [])
                raise DatasetError(
                    f"{folder}: expected the same class folders as train/ ({len(classes)}), got {'; '.join(problems)}"
                )
        splits[name] = _split_files(folder, classes)
    size, resize = config.image_size, config.resize_to
    transforms = _PictureTransforms(size, resize, tuple(config.crop_scale), config.flip)

    def split(files: list[Path], labels: list[int]) -> PictureSplit:
        y = torch.tensor(labels, dtype=torch.int64)
        return PictureSplit(tuple(files), y, transforms, config.workers, config.split_seed)

    files, labels = splits["train"]
    if "val" in splits:
        train, val = split(files, labels), split(*splits["val"])
    else:
        held = _held_out(labels, config.split_seed)
        kept = np.setdiff1d(np.arange(len(files)), held)
        train = split([files[i] for i in kept], [labels[i] for i in kept])
        val = split([files[i] for i in held], [labels[i] for i in held])
    test = split(*splits["test"]) if "test" in splits else None
    mean, std = config.mean, config.std
    if for_training:
        measured_mean, measured_std = train.channel_statistics()
        if mean is None:
            mean, std = measured_mean, measured_std
        for checked in (val, test):
            if checked is not None:
                checked.x  # noqa: B018 - decoded now, so an unreadable file is named before training
    return Dataset(
        "imagefolder",
        tuple(classes),
        (3, size, size),
        None if mean is None else tuple(mean),
        None if std is None else tuple(std),
        train,
        val,
        test,
        augment=config.augment,
        image=ImageSpec(mode="RGB", size=(size, size), scale=1 / 255, invert=False, resize=resize),
        input_space=(
            f"RGB floats in [0, 1] as float32 [3, {size}, {size}] (channels first): a picture resized "
            f"(bilinear) so that its shorter side is {resize}, then centre-cropped to {size}x{size}"
        ),
    )


def load_dataset(config: DataConfig, *, for_training: bool = True) -> Dataset:
    """Load the configured dataset (raw input space); layout errors are raised here, before any work.

    An image folder is checked in full when `for_training`: every picture is decoded once (an
    unreadable file is named before the first step), which also measures the normalization
    statistics the config does not give, and the validation and test splits are decoded and kept.
    `for_training=False` (export, evaluation: they read only the validation and test splits, and
    the model carries its own normalization) skips that pass; pictures are then decoded when a
    split is first read, and `mean`/`std` are the config's, or None.
    """
    if config.dataset == "digits":
        return _digits(config)
    if config.dataset == "imagefolder":
        return _image_folder(config, for_training)
    return _cifar(config)


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
