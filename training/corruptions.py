"""A corruption suite for RGB pictures of any size, in the spirit of CIFAR-10-C (Hendrycks &
Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations",
ICLR 2019): 15 corruption types in four families at severities 1 (mild) to 5 (strong).

    noise     gaussian_noise, shot_noise, impulse_noise, speckle_noise
    blur      defocus_blur, gaussian_blur, motion_blur, zoom_blur
    weather   snow, fog, brightness
    digital   contrast, elastic_transform, pixelate, jpeg_compression

Built from `torchvision.transforms.v2` ops where v2 has one (gaussian_blur, affine, resize,
adjust_contrast, rgb_to_grayscale, elastic), plain tensor maths elsewhere, and Pillow for JPEG.
Severity parameters are CIFAR-10-C's where it has them (noise amounts, blur radii, fog, snow,
brightness, contrast, JPEG qualities); spatial ones are given for 32x32 pictures and scaled up
with larger ones. CIFAR-10-C's frost, glass blur and spatter need texture files or per-pixel
loops and are left out; elastic_transform is a smooth random displacement field (no affine part).

Applied in the raw input space (RGB floats in [0, 1], `[N, 3, H, W]`) and clipped to it. The
suite is deterministic: the randomness of (corruption, severity) comes from a generator seeded by
(seed, corruption, severity) alone, so a report is reproducible and does not depend on which sets
were computed before. (forde_serve/corruptions.py is the numpy digits-C suite for 8x8 digits.)
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CORRUPTIONS", "SEVERITIES", "corrupt", "corrupted_versions"]

SEVERITIES = (1, 2, 3, 4, 5)
_REFERENCE_SIZE = 32  # spatial parameters below are in pixels of a 32x32 picture (CIFAR-10-C's)


def _pixels(x: torch.Tensor, at_32: float) -> float:
    """A length given for a 32x32 picture, in pixels of `x`, scaled up with its shorter side; never below
    the 32x32 value, since a blur or displacement shrunk below a pixel would do nothing."""
    return at_32 * max(1.0, min(x.shape[-2:]) / _REFERENCE_SIZE)


# --- noise -----------------------------------------------------------------------------------


def _gaussian_noise(x, s, g):
    sigma = (0.04, 0.06, 0.08, 0.09, 0.10)[s - 1]
    return x + sigma * torch.randn(x.shape, generator=g)


def _shot_noise(x, s, g):
    photons = (500, 250, 100, 75, 50)[s - 1]  # expected counts at full intensity
    return torch.poisson(x * photons, generator=g) / photons


def _impulse_noise(x, s, g):
    amount = (0.01, 0.02, 0.03, 0.05, 0.07)[s - 1]  # share of values set to 0 or 1, half each
    hit = torch.rand(x.shape, generator=g)
    return torch.where(hit < amount / 2, 0.0, torch.where(hit < amount, 1.0, x))


def _speckle_noise(x, s, g):
    sigma = (0.06, 0.10, 0.12, 0.16, 0.20)[s - 1]
    return x + x * sigma * torch.randn(x.shape, generator=g)


# --- blur ------------------------------------------------------------------------------------


def _filter(x: torch.Tensor, kernels: torch.Tensor, padding: str = "replicate") -> torch.Tensor:
    """Correlate every picture's channels with its own kernel: x `[N, C, H, W]`, kernels `[N, k, k]` (odd k)."""
    n, c, h, w = x.shape
    k = kernels.shape[-1]
    padded = F.pad(x.reshape(1, n * c, h, w), (k // 2,) * 4, mode=padding)
    weight = kernels.repeat_interleave(c, 0).unsqueeze(1).to(x.dtype)  # [N * C, 1, k, k]
    return F.conv2d(padded, weight, groups=n * c).reshape(n, c, h, w)


def _gaussian_blur(x, s, g):
    from torchvision.transforms.v2 import functional as TF

    sigma = _pixels(x, (0.4, 0.6, 0.7, 0.8, 1.0)[s - 1])
    return TF.gaussian_blur(x, kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=sigma)


def _defocus_blur(x, s, g):
    """A disk kernel (radius r) softened by a 3x3 Gaussian (CIFAR-10-C's anti-aliased disk)."""
    from torchvision.transforms.v2 import functional as TF

    radius, alias = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))[s - 1]
    radius = _pixels(x, radius)
    half = math.ceil(radius) + 1
    grid = torch.arange(-half, half + 1, dtype=torch.float32)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius**2).float()
    disk = TF.gaussian_blur(disk[None, None] / disk.sum(), kernel_size=3, sigma=alias)[0, 0]
    return _filter(x, (disk / disk.sum()).expand(len(x), -1, -1))


def _motion_kernels(count: int, sigma: float, angles: torch.Tensor) -> torch.Tensor:
    """One-sided Gaussian streaks `[count, k, k]`: weight exp(-t^2 / 2 sigma^2) at distance t from the
    centre along each angle (degrees), spread onto the grid bilinearly, each summing to one."""
    reach = max(1, math.ceil(3 * sigma))
    size = 2 * reach + 1
    steps = torch.arange(0, reach + 1, 0.5)  # half-pixel steps so a diagonal streak has no gaps
    weights = torch.exp(-(steps**2) / (2 * sigma**2))
    radians = angles[:, None] * (math.pi / 180)
    cols, rows = reach + steps * torch.cos(radians), reach - steps * torch.sin(radians)  # [count, T]
    kernels = torch.zeros(count, size * size)
    r0, c0 = rows.floor(), cols.floor()
    for dr in (0, 1):
        for dc in (0, 1):
            share = (1 - (rows - r0 - dr).abs()) * (1 - (cols - c0 - dc).abs())
            r, c = (r0 + dr).clamp(0, size - 1).long(), (c0 + dc).clamp(0, size - 1).long()
            kernels.scatter_add_(1, r * size + c, share * weights)
    kernels = kernels.view(count, size, size)
    return kernels / kernels.sum((1, 2), keepdim=True)


def _motion_blur(x, s, g):
    sigma = _pixels(x, (1.0, 1.5, 2.0, 2.5, 3.0)[s - 1])
    angles = torch.empty(len(x)).uniform_(-45, 45, generator=g)
    return _filter(x, _motion_kernels(len(x), sigma, angles))


def _zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Zoom into the centre by `factor` (>= 1), same size out (CIFAR-10-C's clipped_zoom)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    return TF.affine(
        x, angle=0.0, translate=[0, 0], scale=factor, shear=[0.0, 0.0], interpolation=InterpolationMode.BILINEAR
    )


def _zoom_blur(x, s, g):
    top = (1.06, 1.11, 1.16, 1.21, 1.26)[s - 1]
    factors = np.arange(1.01, top, 0.01)
    return (x + sum(_zoom(x, float(f)) for f in factors)) / (len(factors) + 1)


# --- weather ---------------------------------------------------------------------------------


def _fractal(count: int, height: int, width: int, decay: float, g: torch.Generator) -> torch.Tensor:
    """Cloud-like noise `[count, 1, height, width]` in [0, 1]: octaves of random grids, each twice as
    fine as the last and `decay` times weaker, upsampled and summed (CIFAR-10-C's plasma fractal,
    by octaves instead of diamond-square)."""
    side = 2
    total = torch.zeros(count, 1, height, width)
    amplitude = 1.0
    while side < 2 * max(height, width):
        grid = torch.randn(count, 1, side, side, generator=g)
        total += amplitude * F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
        amplitude /= decay
        side *= 2
    low = total.amin((2, 3), keepdim=True)
    return (total - low) / (total.amax((2, 3), keepdim=True) - low).clamp_min(1e-12)


def _fog(x, s, g):
    strength, decay = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))[s - 1]
    brightest = x.amax((1, 2, 3), keepdim=True)
    fogged = x + strength * _fractal(len(x), *x.shape[-2:], decay, g)
    return fogged * brightest / (brightest + strength)


def _snow(x, s, g):
    """Flakes: thresholded Gaussian noise, zoomed, streaked by a motion blur, added twice (once
    turned half round); the picture itself is washed toward white first (CIFAR-10-C's recipe)."""
    from torchvision.transforms.v2 import functional as TF

    loc, scale, zoom, threshold, sigma, blend = (
        (0.10, 0.2, 1.00, 0.60, 3.0, 0.95),
        (0.10, 0.2, 1.00, 0.50, 4.0, 0.90),
        (0.15, 0.3, 1.75, 0.55, 4.0, 0.90),
        (0.25, 0.3, 2.25, 0.60, 6.0, 0.85),
        (0.30, 0.3, 1.25, 0.65, 12.0, 0.80),
    )[s - 1]
    flakes = loc + scale * torch.randn(len(x), 1, *x.shape[-2:], generator=g)
    flakes = _zoom(flakes, zoom) if zoom > 1 else flakes
    flakes = torch.where(flakes < threshold, 0.0, flakes)
    angles = torch.empty(len(x)).uniform_(-135, -45, generator=g)
    flakes = _filter(flakes, _motion_kernels(len(x), _pixels(x, sigma), angles), padding="constant")
    washed = torch.maximum(x, TF.rgb_to_grayscale(x) * 1.5 + 0.5)
    x = blend * x + (1 - blend) * washed
    return x + flakes + flakes.flip(-1, -2)


def _brightness(x, s, g):
    """HSV value + c, hue and saturation kept: with those fixed every channel scales by V' / V
    (a black pixel, which has no hue, becomes grey c)."""
    lift = (0.05, 0.10, 0.15, 0.20, 0.30)[s - 1]
    value = x.amax(1, keepdim=True)
    raised = (value + lift).clamp_max(1.0)
    return torch.where(value > 0, x * raised / value.clamp_min(1e-12), raised)


# --- digital ---------------------------------------------------------------------------------


def _contrast(x, s, g):
    from torchvision.transforms.v2 import functional as TF

    return TF.adjust_contrast(x, (0.75, 0.5, 0.4, 0.3, 0.15)[s - 1])


def _elastic_transform(x, s, g):
    """Each picture moved by its own smooth random displacement field (uniform noise blurred with a
    Gaussian of 0.1 x the side, scaled to an RMS displacement that grows with the severity)."""
    from torchvision.transforms.v2 import functional as TF

    rms = _pixels(x, (0.5, 0.75, 1.0, 1.5, 2.0)[s - 1])
    height, width = x.shape[-2:]
    sigma = 0.1 * min(height, width)
    kernel = int(8 * sigma + 1) | 1  # odd, as v2.ElasticTransform sizes it
    fields = TF.gaussian_blur(torch.rand(len(x), 2, height, width, generator=g) * 2 - 1, kernel, sigma)
    fields = fields * rms / fields.square().mean((1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)  # pixels
    scale = torch.tensor([2 / width, 2 / height])  # pixels -> grid units ([-1, 1] across the picture)
    grids = fields.permute(0, 2, 3, 1) * scale  # [N, H, W, 2], (x, y) per position
    # v2's elastic takes one field per call: a loop over pictures, each with its own
    return torch.cat([TF.elastic(x[i : i + 1], grids[i : i + 1]) for i in range(len(x))])


def _pixelate(x, s, g):
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    # Side kept, between CIFAR-10-C's (0.95 to 0.65, mild on 32x32) and ImageNet-C's (0.6 to 0.25):
    # near 1, nearest-neighbour upsampling mostly shifts pixels by one, so severity would not grow.
    factor = (0.8, 0.7, 0.6, 0.5, 0.4)[s - 1]
    height, width = x.shape[-2:]
    small = TF.resize(x, [max(1, int(height * factor)), max(1, int(width * factor))], antialias=True)
    return TF.resize(small, [height, width], interpolation=InterpolationMode.NEAREST)


def _jpeg_compression(x, s, g):
    """Each picture saved as a JPEG at CIFAR-10-C's quality and read back, with Pillow (v2's JPEG op
    encodes with torchvision.io, whose image codecs are deprecated since torchvision 0.29)."""
    from PIL import Image

    quality = (80, 65, 58, 50, 40)[s - 1]
    as_bytes = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for picture in as_bytes:
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out.append(np.asarray(decoded.convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


CORRUPTIONS: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise,
    "defocus_blur": _defocus_blur,
    "gaussian_blur": _gaussian_blur,
    "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """`x` `[N, 3, H, W]` RGB in [0, 1] corrupted by `name` at `severity` (1 to 5), float32 in [0, 1].

    The same inputs, name, severity and seed give the same output."""
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption: expected one of {', '.join(CORRUPTIONS)}, got {name!r}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity: expected 1 to 5, got {severity}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"x: expected RGB pictures [N, 3, H, W], got {list(x.shape)}")
    state = np.random.SeedSequence([seed, list(CORRUPTIONS).index(name), severity]).generate_state(1, np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state))
    with torch.no_grad():
        return CORRUPTIONS[name](x.float(), severity, generator).clamp(0.0, 1.0)


def corrupted_versions(x: torch.Tensor, seed: int = 0) -> Iterator[tuple[str, int, torch.Tensor]]:
    """Every (corruption, severity, corrupted x) of the suite, one set at a time, in a fixed order."""
    for name in CORRUPTIONS:
        for severity in SEVERITIES:
            yield name, severity, corrupt(x, name, severity, seed)
