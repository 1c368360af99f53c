"""The saliency figure: where each member of the ensemble looks, drawn so a person can read it.

One panel shows the input; one the members' mean gradient; then one panel per member, each the
input in grey with that member's input gradient (of one class's logit) overlaid in a diverging
colormap centred at zero: red where raising the pixel raises the class's score, blue where it
lowers it, clear where it does not matter. All gradient panels share one symmetric colour scale
and one colorbar, so a strong colour means the same in every panel. Pixels are drawn as blocks
(nearest neighbour), never blurred: an 8x8 digit shows its 64 pixels.

Used by the HTTP `/explain` endpoint (`saliency_png: true`) and the `/ui` page. matplotlib's
object API only (no pyplot state), so concurrent requests can draw at the same time.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

from forde_serve.contract import ImageSpec

__all__ = ["saliency_figure", "saliency_png"]

_MAX_COLUMNS = 10  # panels per row before the figure wraps
_PANEL_INCHES = 1.45
_CMAP = "RdBu_r"  # diverging: blue negative, white zero, red positive


def saliency_png(
    x: np.ndarray,
    gradients: np.ndarray,
    member_probs: np.ndarray,
    class_names: Sequence[str],
    target: int,
    image: ImageSpec | None = None,
    dpi: int = 100,
) -> bytes:
    """The figure of `saliency_figure` as PNG bytes."""
    figure = saliency_figure(x, gradients, member_probs, class_names, target, image)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def saliency_figure(
    x: np.ndarray,
    gradients: np.ndarray,
    member_probs: np.ndarray,
    class_names: Sequence[str],
    target: int,
    image: ImageSpec | None = None,
):
    """Input, members' mean gradient and one panel per member, as a matplotlib `Figure`.

    x: one raw input `[channels, height, width]`; gradients: `[members, channels, height, width]`,
    d member_logit[target] / d input; member_probs: `[members, classes]`; target: the class whose
    logit was differentiated; image: the model card's image spec (its `invert` says whether a
    high value is dark ink), or None to show high values bright.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    x, gradients, member_probs = np.asarray(x), np.asarray(gradients), np.asarray(member_probs)
    if x.ndim != 3 or gradients.shape[1:] != x.shape or member_probs.shape[0] != gradients.shape[0]:
        raise ValueError(
            f"expected x [C, H, W], gradients [M, C, H, W] and member_probs [M, classes], got "
            f"{list(x.shape)}, {list(gradients.shape)} and {list(member_probs.shape)}"
        )
    members, channels = gradients.shape[:2]
    # Channels combined by summing the signed gradients: the effect of raising a pixel in every channel.
    maps = gradients.sum(axis=1)  # [M, H, W]
    mean_map = maps.mean(axis=0)
    grey = _grey(x, image)
    limit = max(float(np.abs(maps).max()), 1e-12)  # symmetric, shared by every gradient panel
    norm = Normalize(vmin=-limit, vmax=limit)
    ensemble_probs = member_probs.mean(axis=0)
    target_name = class_names[target]

    panels = [("input", None)]
    panels.append((f"mean of members\nensemble: {_vote(ensemble_probs, class_names)}", mean_map))
    for m in range(members):
        panels.append((f"member {m + 1}\nsays {_vote(member_probs[m], class_names)}", maps[m]))

    rows = math.ceil(len(panels) / _MAX_COLUMNS)
    columns = math.ceil(len(panels) / rows)
    # Laid out by hand in inches: matplotlib's constrained layout would double the drawing time.
    size, gap, title, top, bottom, left, bar = _PANEL_INCHES, 0.12, 0.45, 0.5, 0.1, 0.1, 0.95
    width = left + columns * size + (columns - 1) * gap + bar
    height = top + rows * (title + size) + bottom
    figure = Figure(figsize=(width, height))
    for index, (caption, gradient_map) in enumerate(panels):
        row, column = divmod(index, columns)
        x0 = left + column * (size + gap)
        y0 = height - top - (row + 1) * (title + size)
        axis = figure.add_axes((x0 / width, y0 / height, size / width, size / height))
        if gradient_map is None and channels == 3:  # the input panel keeps its colours
            axis.imshow(_unit_range(x, image).transpose(1, 2, 0), interpolation="nearest", aspect="auto")
        else:
            axis.imshow(grey, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
        if gradient_map is not None:
            axis.imshow(_overlay(gradient_map, norm, _CMAP), interpolation="nearest", aspect="auto")
        axis.set_xticks([])
        axis.set_yticks([])
        for spine in axis.spines.values():
            spine.set_color("0.75")
        axis.set_title(caption, fontsize=9)
    bar_axis = figure.add_axes(
        ((width - bar + 0.15) / width, (bottom + 0.1) / height, 0.12 / width, (height - top - bottom - title) / height)
    )
    colorbar = figure.colorbar(ScalarMappable(norm=norm, cmap=_CMAP), cax=bar_axis)
    colorbar.set_label(f"d logit[{target_name}] / d pixel", fontsize=8)
    colorbar.ax.tick_params(labelsize=7)

    brighter = "darker (more ink)" if image is not None and image.invert else "brighter"
    combined = (
        f" Gradient panels show the {'RGB' if channels == 3 else f'{channels}-channel'} input in grey; "
        f"each pixel's gradient is the sum over its {channels} channels."
        if channels > 1
        else ""
    )
    figure.suptitle(
        f"Where each member looks for class {target_name}: red = making this pixel {brighter} raises the "
        f"member's score for {target_name}, blue = lowers it, clear = no effect.{combined}",
        fontsize=9,
        wrap=True,
        y=1 - 0.08 / height,
        va="top",
    )
    return figure


def _vote(probs: np.ndarray, class_names: Sequence[str]) -> str:
    top = int(np.argmax(probs))
    return f"{class_names[top]} ({float(probs[top]):.2f})"


def _unit_range(x: np.ndarray, image: ImageSpec | None) -> np.ndarray:
    """`x` mapped to [0, 1] as a person would see it (dark ink dark), same shape."""
    low, high = float(x.min()), float(x.max())
    if image is not None:  # the file says which raw range a full-scale pixel spans
        low, high = 0.0, 255.0 * image.scale
    unit = np.clip((x - low) / max(high - low, 1e-12), 0.0, 1.0)
    return 1.0 - unit if image is not None and image.invert else unit


def _grey(x: np.ndarray, image: ImageSpec | None) -> np.ndarray:
    """`[H, W]` in [0, 1]: the picture in grey, faded so the overlay's colours stay readable on it."""
    unit = _unit_range(x, image)
    # ITU-R 601 luma for RGB, as PIL's "L" mode; other channel counts are averaged.
    grey = 0.299 * unit[0] + 0.587 * unit[1] + 0.114 * unit[2] if len(unit) == 3 else unit.mean(axis=0)
    return 0.35 + 0.65 * grey


def _overlay(gradient_map: np.ndarray, norm, cmap_name: str) -> np.ndarray:
    """RGBA `[H, W, 4]`: the diverging colour of each gradient, opaque where it is strong."""
    from matplotlib import colormaps

    rgba = colormaps[cmap_name](norm(gradient_map))
    strength = np.abs(gradient_map) / norm.vmax
    rgba[..., 3] = np.clip(strength, 0.0, 1.0) ** 0.6 * 0.95
    return rgba
