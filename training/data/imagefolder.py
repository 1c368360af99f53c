"""The user's own pictures: `root/train/<class>/*.png|jpg|jpeg|webp|bmp`, optional `root/val/` and
`root/test/` (torchvision's ImageFolder layout), RGB floats in [0, 1] as `[3, S, S]`.

The training split is streamed: decoded and augmented a batch at a time, so it need not fit in
memory; the validation and test splits are decoded once, at the evaluation transform, and kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from forde_serve.contract import ImageSpec
from training.config import DataConfig
from training.data._base import Dataset, DatasetError

__all__ = ["PICTURE_SUFFIXES", "PictureSplit", "load_image_folder"]

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # what an image folder's class folders may hold
_VALIDATION_SHARE = 0.1  # of each class, held out when an image folder has no val/
_DECODE_BATCH = 256  # pictures per decoding batch outside training (statistics, validation, test)


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


def load_image_folder(config: DataConfig, for_training: bool = True) -> Dataset:
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
