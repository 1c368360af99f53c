"""Figures of a stream replay (`forde_serve.monitoring.stream`): the shift martingale over rows with its
alarm line, and the running coverage of static, Mondrian and adaptive sets. Each function returns a
matplotlib `Figure` built without pyplot (no global state, safe in a server); `save_png` writes one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

__all__ = ["coverage_figure", "martingale_figure", "save_png"]

_STYLES = {"static": ("tab:red", "static (split conformal)"), "mondrian": ("tab:blue", "Mondrian (label-free)"),
           "adaptive": ("tab:green", "adaptive (labels fed back)")}  # fmt: skip


def martingale_figure(
    log_statistics: Mapping[str, Sequence[float]], threshold: float = 100.0, title: str = "Shift test"
) -> Figure:
    """log10 M_t over rows, one line per stream (name -> ln M after each row), with the alarm at
    M = `threshold` (1/delta) and a dot where each stream first reached it."""
    figure = Figure(figsize=(6.0, 3.6))
    axis = figure.subplots()
    for name, values in log_statistics.items():
        log10 = [v / math.log(10) for v in values]
        (line,) = axis.plot(range(1, len(log10) + 1), log10, label=name, linewidth=1.2)
        fired = next((t for t, v in enumerate(values, 1) if v >= math.log(threshold)), None)
        if fired is not None:
            axis.plot([fired], [log10[fired - 1]], "o", color=line.get_color(), markersize=4)
    axis.axhline(math.log10(threshold), color="black", linestyle="--", linewidth=1, label=f"alarm (M = {threshold:g})")
    axis.set_xlabel("rows served since arming")
    axis.set_ylabel("log10 M (shift evidence)")
    axis.set_title(title)
    axis.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    return figure


def coverage_figure(running: Mapping[str, Sequence[float]], target: float = 0.9, title: str = "Coverage") -> Figure:
    """Running coverage over rows (kind -> coverage of the first t rows, per t), with the target level."""
    figure = Figure(figsize=(6.0, 3.6))
    axis = figure.subplots()
    for kind, values in running.items():
        color, label = _STYLES.get(kind, (None, kind))
        axis.plot(range(1, len(values) + 1), values, color=color, label=label, linewidth=1.2)
    axis.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}")
    axis.set_ylim(0.0, 1.02)
    axis.set_xlabel("rows")
    axis.set_ylabel("coverage of the first t rows")
    axis.set_title(title)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return figure


def save_png(figure: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write `figure` as a PNG at `path` and return the path."""
    path = Path(path)
    figure.savefig(path, format="png", dpi=dpi)
    return path
