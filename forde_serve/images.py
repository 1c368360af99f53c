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
    """A decoded picture -> raw input `[channels, height, width]` float32, as the model's `spec` says."""
    from PIL import Image

    converted = picture.convert(spec["mode"]).resize(tuple(spec["size"][::-1]), Image.BILINEAR)
    array = np.asarray(converted, dtype=np.float32)
    if spec["invert"]:
        array = 255.0 - array
    array = array * np.float32(spec["scale"])
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
