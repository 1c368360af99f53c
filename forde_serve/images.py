"""Pictures to raw inputs, as an exported model's `forde.image` metadata says (mode, size, scale,
invert). Shared by the HTTP `predict_image` endpoint and batch scoring of image folders, so an
uploaded file and the same file in a folder give the same numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

from forde_serve.runtime import InvalidInput

__all__ = ["IMAGE_SUFFIXES", "ImageTooLarge", "image_to_input"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_IMAGE_PIXELS = 4096 * 4096


class ImageTooLarge(InvalidInput):
    """A picture with more pixels than we decode (HTTP 413)."""


def image_to_input(
    source: str | Path | BinaryIO, spec: dict | None, field: str = "image", max_pixels: int = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Decode a picture into the model's raw input `[channels, height, width]` float32."""
    if spec is None:
        raise InvalidInput(f"{field}: this model takes arrays, not images (its file has no image metadata)")
    with _open_image(source, field, max_pixels) as picture:
        return _to_model_input(picture, spec)


def _open_image(source: str | Path | BinaryIO, field: str, max_pixels: int):
    """The decoded picture (PIL), or InvalidInput / ImageTooLarge naming `field`."""
    from PIL import Image, UnidentifiedImageError

    try:
        picture = Image.open(source)
        if picture.width * picture.height > max_pixels:
            picture.close()
            raise ImageTooLarge(f"{field}: expected at most {max_pixels} pixels, got {picture.width}x{picture.height}")
        picture.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise InvalidInput(
            f"{field}: expected a PNG or JPEG file, got something that does not decode ({err})"
        ) from None
    return picture


def _to_model_input(picture, spec: dict) -> np.ndarray:
    """A decoded picture -> raw input `[channels, height, width]` float32, as the model's `spec` says.

    A spec with `crop` (an image folder's evaluation transform) resizes the shorter side to `resize`
    and centre-crops `crop`, with torchvision's own size and offset arithmetic on the same PIL calls,
    so an upload becomes exactly the input the model was validated and tested on. Without it
    (digits, CIFAR) the picture is resized to `size` as a whole.
    """
    from PIL import Image

    converted = picture.convert(spec["mode"])
    if "crop" in spec:
        converted = _centre_crop(_resize_shorter_side(converted, int(spec["resize"])), *spec["crop"])
    else:
        converted = converted.resize(tuple(spec["size"][::-1]), Image.BILINEAR)
    array = np.asarray(converted, dtype=np.float32)
    if spec["invert"]:
        array = 255.0 - array
    array = array * np.float32(spec["scale"])
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _resize_shorter_side(picture, shorter: int):
    """torchvision's Resize(int) on a PIL image: the shorter side becomes `shorter`, the longer
    int(shorter * long / short) (truncated), bilinear; a picture already that size is kept as is."""
    from PIL import Image

    width, height = picture.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shorter, int(shorter * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_width, new_height) == (width, height):
        return picture
    return picture.resize((new_width, new_height), Image.BILINEAR)


def _centre_crop(picture, height: int, width: int):
    """torchvision's CenterCrop on a PIL image no smaller than the crop: offsets rounded half to even."""
    top = int(round((picture.height - height) / 2.0))
    left = int(round((picture.width - width) / 2.0))
    return picture.crop((left, top, left + width, top + height))
