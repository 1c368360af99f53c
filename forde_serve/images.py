"""Pictures to raw inputs, as an exported model's picture spec says (`contract.ImageSpec`: mode, size,
scale, invert). Shared by the HTTP `predict_image` endpoint and batch scoring of image folders, so an
uploaded file and the same file in a folder give the same numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

from forde_serve.contract import ImageSpec
from forde_serve.runtime import InvalidInput

__all__ = ["IMAGE_FORMATS", "IMAGE_SUFFIXES", "ImageTooLarge", "image_to_input"]

# The decoders we run on a caller's bytes (Pillow names), chosen by the bytes, never by a file name or
# a declared type. Pillow knows more, but some hand files to outside programs (EPS to Ghostscript) and
# the rest are rarely what a camera or a browser makes.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
# What a folder scan (`forde score images/`) picks up, case-insensitively; the format still comes
# from the content (a .jpg holding a PNG decodes as the PNG it is). Files without a suffix are not
# scanned: a folder often holds notes and listings beside its pictures.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MAX_IMAGE_PIXELS = 4096 * 4096
# Colour modes a decoded picture may come in and still convert to the model's mode (L, RGB): Pillow
# cannot convert LAB or La, which TIFF can hold.
_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "HSV", "I", "I;16", "F"}
_NAMES = ", ".join(IMAGE_FORMATS[:-1]) + " or " + IMAGE_FORMATS[-1]


class ImageTooLarge(InvalidInput):
    """A picture with more pixels than we decode, or a decompression bomb (HTTP 413)."""


def image_to_input(
    source: str | Path | BinaryIO, spec: ImageSpec | None, field: str = "image", max_pixels: int = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Decode a picture into the model's raw input `[channels, height, width]` float32."""
    if spec is None:
        raise InvalidInput(f"{field}: this model takes arrays, not images (its file has no image metadata)")
    with _open_image(source, field, max_pixels) as picture:
        return _to_model_input(picture, spec)


def _open_image(source: str | Path | BinaryIO, field: str, max_pixels: int):
    """The decoded picture (PIL), or InvalidInput / ImageTooLarge naming `field`.

    Messages never quote Pillow's own, which name the file: for an upload that is a server temp path.
    """
    import struct

    from PIL import Image, UnidentifiedImageError

    try:
        picture = Image.open(source, formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise InvalidInput(f"{field}: expected a {_NAMES} picture, got data that does not decode as one") from None
    except Image.DecompressionBombError:  # dimensions far past Pillow's own limit, refused before decoding
        raise ImageTooLarge(
            f"{field}: expected at most {max_pixels} pixels, got a picture of more than {2 * Image.MAX_IMAGE_PIXELS}"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
        raise _undecodable(field, "", err) from None
    try:
        if picture.width * picture.height > max_pixels:
            raise ImageTooLarge(f"{field}: expected at most {max_pixels} pixels, got {picture.width}x{picture.height}")
        try:
            picture.load()
        # Pillow's decoders signal broken data with any of these.
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as err:
            raise _undecodable(field, picture.format, err) from None
        if picture.mode not in _MODES:
            raise InvalidInput(f"{field}: expected a picture in a common colour mode, got a {picture.mode} one")
    except InvalidInput:
        picture.close()
        raise
    return picture


def _undecodable(field: str, format: str | None, err: Exception) -> InvalidInput:
    # A PNG text chunk that inflates past Pillow's limit is a decompression bomb, like too many pixels;
    # Pillow says so only in words.
    if isinstance(err, ValueError) and "Decompressed data too large" in str(err):
        return ImageTooLarge(f"{field}: expected a picture, got metadata that inflates past Pillow's limit (a bomb)")
    return InvalidInput(f"{field}: expected a {_NAMES} picture, got a {format or 'picture'} file that does not decode")


def _to_model_input(picture, spec: ImageSpec) -> np.ndarray:
    """A decoded picture -> raw input `[channels, height, width]` float32, as the model's `spec` says.

    A spec with `resize` (an image folder's evaluation transform) resizes the shorter side to `resize`
    and centre-crops `size`, with torchvision's own size and offset arithmetic on the same PIL calls,
    so an upload becomes exactly the input the model was validated and tested on. Without it
    (digits, CIFAR) the picture is resized to `size` as a whole.
    """
    from PIL import Image

    converted = picture.convert(spec.mode)
    if spec.resize is not None:
        converted = _centre_crop(_resize_shorter_side(converted, spec.resize), *spec.size)
    else:
        converted = converted.resize(spec.size[::-1], Image.BILINEAR)
    array = np.asarray(converted, dtype=np.float32)
    if spec.invert:
        array = 255.0 - array
    array = array * np.float32(spec.scale)
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
