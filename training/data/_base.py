"""What every dataset is: splits in the raw input space, the training batches, the picture specs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from forde_serve.contract import ImageSpec
from forde_serve.errors import FordeError

__all__ = ["IMAGE_SPECS", "INPUT_SPACES", "Dataset", "DatasetError", "Split", "augment_batch", "channel_stats"]

_PCA_PICTURES = 10_000  # at most this many training pictures (a fixed-seed sample) for the FoRDE PCA basis


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


class PictureSplitLike(Protocol):
    """An image folder's split (`training.data.imagefolder.PictureSplit`): files decoded when read."""

    y: torch.Tensor  # [N] int64

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Dataset:
    name: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    # Per channel, of the training split; None for an image folder loaded with for_training=False
    # and no statistics in its config (export and evaluation do not need them: the model carries its own).
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    train: Split | PictureSplitLike
    val: Split | PictureSplitLike
    test: Split | PictureSplitLike | None  # None: an image folder without test/
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
        if not isinstance(self.train, Split):  # pictures, decoded as they are read
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


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    per_channel = x.transpose(0, 1).flatten(1).double()
    return tuple(per_channel.mean(1).tolist()), tuple(per_channel.std(1).clamp_min(1e-6).tolist())


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
