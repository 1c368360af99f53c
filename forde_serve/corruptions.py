"""digits-C: a corruption suite for small grayscale (or colour) images, in numpy, in the raw input space.

Eleven corruption types at severities 1 (mild) to 5 (strong), in the spirit of CIFAR-10-C
(Hendrycks & Dietterich, 2019) but sized for 8x8 digits. Deterministic: the same inputs, seed,
type and severity give the same corrupted array. Every function takes `x` `[N, C, H, W]` in the
range `[low, high]` (digits: 0 to 16) and returns float32 in that range.

`HELD_OUT_SHIFTS` is a second, separate registry: four shifts that are not in digits-C, each at one
fixed strength, chosen before any serving-under-shift method was measured on them (shear, zoom-out,
stroke thickening, gamma). Methods are tuned on digits-C and judged on these; never tune on them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np

__all__ = ["CORRUPTIONS", "HELD_OUT_SHIFTS", "SEVERITIES", "corrupt", "corrupted_versions", "shift"]

SEVERITIES = (1, 2, 3, 4, 5)


def _gaussian_noise(x, s, rng, low, high):
    sigma = (0.06, 0.12, 0.18, 0.26, 0.36)[s - 1] * (high - low)
    return x + rng.normal(0.0, sigma, x.shape)


def _shot_noise(x, s, rng, low, high):
    photons = (60, 25, 12, 5, 3)[s - 1]  # expected counts at full intensity
    unit = (x - low) / (high - low)
    return low + rng.poisson(unit * photons) / photons * (high - low)


def _impulse_noise(x, s, rng, low, high):
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[s - 1]
    hit = rng.random(x.shape)
    out = x.copy()
    out[hit < amount / 2] = low
    out[(hit >= amount / 2) & (hit < amount)] = high
    return out


def _convolve(x, kernel: np.ndarray):
    """2-D correlation of every `[H, W]` plane with `kernel` (odd size), reflect padding."""
    kh, kw = kernel.shape
    padded = np.pad(x, ((0, 0), (0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)), mode="reflect")
    height, width = x.shape[2:]
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            if kernel[i, j]:
                out += kernel[i, j] * padded[:, :, i : i + height, j : j + width]
    return out


def _gaussian_blur(x, s, rng, low, high):
    sigma = (0.4, 0.6, 0.8, 1.0, 1.3)[s - 1]
    radius = max(1, math.ceil(2 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    return _convolve(x, np.outer(taps, taps))


def _motion_blur(x, s, rng, low, high):
    """Average along a line of `length` pixels, in one of four directions drawn per image."""
    length = (2, 3, 4, 5, 6)[s - 1]
    size = 2 * (length // 2) + 1
    out = np.empty_like(x, dtype=np.float64)
    directions = rng.integers(0, 4, len(x))
    for d in range(4):
        kernel = np.zeros((size, size))
        di, dj = [(0, 1), (1, 0), (1, 1), (1, -1)][d]
        for t in range(length):  # consecutive taps: a streak, never a double image
            offset = t - length // 2
            kernel[size // 2 + offset * di, size // 2 + offset * dj] += 1
        kernel /= kernel.sum()
        chosen = directions == d
        if chosen.any():
            out[chosen] = _convolve(x[chosen], kernel)
    return out


def _contrast(x, s, rng, low, high):
    factor = (0.6, 0.45, 0.3, 0.2, 0.12)[s - 1]
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - mean) * factor + mean


def _brightness(x, s, rng, low, high):
    return x + (0.12, 0.24, 0.36, 0.5, 0.62)[s - 1] * (high - low)


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """`[n_out, n_in]`: each output cell the area-weighted mean of the input cells it covers."""
    matrix = np.zeros((n_out, n_in))
    for o in range(n_out):
        start, stop = o * n_in / n_out, (o + 1) * n_in / n_out
        for i in range(int(start), math.ceil(stop)):
            matrix[o, i] = min(stop, i + 1) - max(start, i)
    return matrix / matrix.sum(axis=1, keepdims=True)


def _pixelate(x, s, rng, low, high):
    """Average down to a coarser grid, then blow the blocks back up (nearest)."""
    height, width = x.shape[2:]
    scale = (0.75, 0.62, 0.5, 0.38, 0.25)[s - 1]
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    small = np.einsum("oh,nchw,pw->ncop", _area_matrix(height, h), x, _area_matrix(width, w))
    rows = np.minimum((np.arange(height) * h) // height, h - 1)
    cols = np.minimum((np.arange(width) * w) // width, w - 1)
    return small[:, :, rows][:, :, :, cols]


def _sample(x, rows: np.ndarray, cols: np.ndarray, fill: float):
    """Bilinear sampling of every image at source coordinates `rows`, `cols` `[N, H, W]`; outside = fill."""
    n, c, height, width = x.shape
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    fr, fc = rows - r0, cols - c0
    out = np.zeros((n, c, height, width))
    index = np.arange(n)[:, None, None]
    for dr, wr in ((0, 1 - fr), (1, fr)):
        for dc, wc in ((0, 1 - fc), (1, fc)):
            rr, cc = r0 + dr, c0 + dc
            inside = (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width)
            values = x[index, :, np.clip(rr, 0, height - 1), np.clip(cc, 0, width - 1)]  # [N, H, W, C]
            values = np.where(inside[..., None], values, fill)
            out += (wr * wc)[:, None] * values.transpose(0, 3, 1, 2)
    return out


def _translate(x, s, rng, low, high):
    shift = (1.0, 1.5, 2.0, 2.5, 3.0)[s - 1]  # pixels, in a random direction (bilinear)
    n, _, height, width = x.shape
    angle = rng.uniform(0, 2 * np.pi, n)
    dr, dc = shift * np.sin(angle), shift * np.cos(angle)
    grid_r, grid_c = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return _sample(x, grid_r[None] - dr[:, None, None], grid_c[None] - dc[:, None, None], low)


def _rotate(x, s, rng, low, high):
    degrees = (10, 20, 30, 40, 50)[s - 1]
    n, _, height, width = x.shape
    theta = np.deg2rad(degrees) * rng.choice([-1.0, 1.0], n)
    grid_r, grid_c = np.meshgrid(
        np.arange(height) - (height - 1) / 2, np.arange(width) - (width - 1) / 2, indexing="ij"
    )
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    rows = cos * grid_r[None] - sin * grid_c[None] + (height - 1) / 2
    cols = sin * grid_r[None] + cos * grid_c[None] + (width - 1) / 2
    return _sample(x, rows, cols, low)


def _occlusion(x, s, rng, low, high):
    """A square patch of background (`low`) at a random place."""
    n, _, height, width = x.shape
    side = max(1, round((0.25, 0.35, 0.45, 0.55, 0.65)[s - 1] * min(height, width)))
    top = rng.integers(0, height - side + 1, n)
    left = rng.integers(0, width - side + 1, n)
    out = x.copy()
    for i in range(n):
        out[i, :, top[i] : top[i] + side, left[i] : left[i] + side] = low
    return out


CORRUPTIONS: dict[str, Callable] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur,
    "motion_blur": _motion_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "pixelate": _pixelate,
    "translate": _translate,
    "rotate": _rotate,
    "occlusion": _occlusion,
}


def corrupt(x: np.ndarray, name: str, severity: int, seed: int = 0, low: float = 0.0, high: float = 16.0) -> np.ndarray:
    """`x` `[N, C, H, W]` (raw values in [low, high]) with corruption `name` at `severity` 1-5."""
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption: expected one of {', '.join(CORRUPTIONS)}, got {name!r}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity: expected 1 to 5, got {severity!r}")
    rng = np.random.default_rng([seed, list(CORRUPTIONS).index(name), severity])
    out = CORRUPTIONS[name](np.asarray(x, dtype=np.float64), severity, rng, low, high)
    return np.clip(out, low, high).astype(np.float32)


def corrupted_versions(
    x: np.ndarray, seed: int = 0, low: float = 0.0, high: float = 16.0
) -> Iterator[tuple[str, int, np.ndarray]]:
    """Every (corruption, severity, corrupted x) of the suite, in a fixed order."""
    for name in CORRUPTIONS:
        for severity in SEVERITIES:
            yield name, severity, corrupt(x, name, severity, seed, low, high)


def _shear(x, rng, low, high):
    """Horizontal shear about the centre, factor 0.3 (a row 1 pixel below the centre moves 0.3
    pixel sideways), sign drawn per image (bilinear)."""
    n, _, height, width = x.shape
    factor = 0.3 * rng.choice([-1.0, 1.0], n)[:, None, None]
    grid_r, grid_c = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    cols = grid_c[None] + factor * (grid_r[None] - (height - 1) / 2)
    return _sample(x, np.broadcast_to(grid_r, cols.shape), cols, low)


def _zoom_out(x, rng, low, high):
    """The picture shrunk to 0.7 of its size about the centre (bilinear), background around it."""
    _, _, height, width = x.shape
    grid_r, grid_c = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    rows = (grid_r - (height - 1) / 2) / 0.7 + (height - 1) / 2
    cols = (grid_c - (width - 1) / 2) / 0.7 + (width - 1) / 2
    shape = (len(x), height, width)
    return _sample(x, np.broadcast_to(rows, shape), np.broadcast_to(cols, shape), low)


def _thicken(x, rng, low, high):
    """Strokes one pixel thicker (they grow up and to the left): grey-level dilation with a 2x2 square,
    the maximum of each pixel and its right, lower and lower-right neighbours (edge pixels repeat)."""
    padded = np.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1)), mode="edge")
    return np.maximum.reduce(
        [padded[:, :, :-1, :-1], padded[:, :, 1:, :-1], padded[:, :, :-1, 1:], padded[:, :, 1:, 1:]]
    )


def _gamma(x, rng, low, high):
    """Intensity curve u -> u ** 2 on u = (x - low) / (high - low): full ink stays, faint ink fades."""
    unit = np.clip((x - low) / (high - low), 0.0, 1.0)
    return low + unit**2.0 * (high - low)


HELD_OUT_SHIFTS: dict[str, Callable] = {
    "shear": _shear,
    "zoom_out": _zoom_out,
    "thicken": _thicken,
    "gamma": _gamma,
}


def shift(x: np.ndarray, name: str, seed: int = 0, low: float = 0.0, high: float = 16.0) -> np.ndarray:
    """`x` `[N, C, H, W]` (raw values in [low, high]) under held-out shift `name` (`HELD_OUT_SHIFTS`)."""
    if name not in HELD_OUT_SHIFTS:
        raise ValueError(f"shift: expected one of {', '.join(HELD_OUT_SHIFTS)}, got {name!r}")
    rng = np.random.default_rng([seed, 1000 + list(HELD_OUT_SHIFTS).index(name)])
    out = HELD_OUT_SHIFTS[name](np.asarray(x, dtype=np.float64), rng, low, high)
    return np.clip(out, low, high).astype(np.float32)
