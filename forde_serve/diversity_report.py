"""The diversity part of an evaluation report: its figures and its Markdown section (the numbers are
`forde_serve.diversity`'s, in metrics.json's `diversity` block).

Each figure function returns a `draw(plt) -> Figure` for `forde_serve.report` to save, as its own do.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["by_size_figure", "disagreement_figure", "diversity_section", "plane_figure", "trajectory_figure"]


def disagreement_figure(diversity: dict):
    """Heatmap of the pairwise disagreement `[M, M]`, with the weight cosine beside it when known."""
    panels = [("prediction disagreement", np.asarray(diversity["pairwise_disagreement"]), "viridis")]
    if diversity.get("weight_cosine_similarity") is not None:
        panels.append(("weight cosine similarity", np.asarray(diversity["weight_cosine_similarity"]), "coolwarm"))

    def draw(plt):
        figure, axes = plt.subplots(
            1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False, layout="constrained"
        )
        for axis, (title, values, cmap) in zip(axes[0], panels, strict=True):
            members = len(values)
            low, high = (-1.0, 1.0) if cmap == "coolwarm" else (0.0, max(float(values.max()), 1e-6))
            image = axis.imshow(values, cmap=cmap, vmin=low, vmax=high)
            for i in range(members):
                for j in range(members):
                    # dark text on the light middle of either colour map
                    light = 0.25 < (values[i, j] - low) / (high - low) < 0.75 if cmap == "coolwarm" else False
                    axis.text(
                        j,
                        i,
                        f"{values[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="black" if light or (cmap == "viridis" and values[i, j] > 0.7 * high) else "white",
                    )
            ticks = list(range(members))
            labels = [str(m + 1) for m in ticks]
            axis.set(
                xticks=ticks,
                yticks=ticks,
                xticklabels=labels,
                yticklabels=labels,
                xlabel="member",
                ylabel="member",
                title=title,
            )
            figure.colorbar(image, ax=axis, shrink=0.85)
        return figure

    return draw


def by_size_figure(diversity: dict):
    """Accuracy and NLL of k-member ensembles (mean over member subsets), k = 1..M."""

    def draw(plt):
        figure, axes = plt.subplots(1, 2, figsize=(8.5, 3.4), layout="constrained")
        sizes = range(1, len(diversity["accuracy_by_size"]) + 1)
        for axis, key, label in ((axes[0], "accuracy_by_size", "accuracy"), (axes[1], "nll_by_size", "NLL")):
            axis.plot(sizes, diversity[key], marker="o", color="black")
            axis.set(xlabel="members in the ensemble", ylabel=f"clean {label}", title=f"{label} by ensemble size")
            axis.set_xticks(list(sizes))
        return figure

    return draw


def trajectory_figure(points: np.ndarray):
    """The members' training trajectories `[M, frames, 2]` in t-SNE coordinates: one line per member
    from its initialization (circle) to the end of training (star)."""

    def draw(plt):
        figure, axis = plt.subplots(figsize=(5.2, 4.4))
        for member, path in enumerate(points):
            line = axis.plot(path[:, 0], path[:, 1], marker=".", linewidth=1, label=f"member {member + 1}")
            color = line[0].get_color()
            axis.scatter(*path[0], marker="o", s=40, color=color, edgecolors="black")
            axis.scatter(*path[-1], marker="*", s=120, color=color, edgecolors="black")
        axis.set(
            xticks=[],
            yticks=[],
            title="Members' predictions along training (t-SNE)\ncircle: initialization, star: end",
        )
        axis.legend(loc="best", fontsize="x-small")
        return figure

    return draw


def plane_figure(names: Sequence[str], accuracy: Sequence[float], disagreement: Sequence[float]):
    """The diversity-accuracy plane (Fort, Hu, Lakshminarayanan 2019, figure 6): one point per report,
    clean accuracy against the members' mean disagreement / (1 - accuracy)."""

    def draw(plt):
        figure, axis = plt.subplots(figsize=(5.4, 4.2))
        for name, x, y in zip(names, accuracy, disagreement, strict=True):
            axis.scatter(x, y, s=50)
            axis.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        axis.set(
            xlabel="clean accuracy",
            ylabel="mean disagreement / (1 - accuracy)",
            title="Diversity-accuracy plane",
        )
        axis.grid(alpha=0.3)
        return figure

    return draw


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def diversity_section(metrics: dict) -> list[str]:
    """Report Markdown lines for metrics.json's `diversity` block (none without it)."""
    diversity = metrics.get("diversity")
    if not diversity:
        return []
    js = diversity["js_divergence"]
    lines = [
        "",
        "## Diversity (how differently the members predict)",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| mean pairwise disagreement (clean) | {_fmt(diversity['mean_disagreement'])} |",
        f"| disagreement / (1 - accuracy) | {_fmt(diversity['normalized_disagreement'])} |",
        f"| mean pairwise JS divergence, clean (nats) | {_fmt(js['clean'])} |",
        f"| mean pairwise JS divergence, corrupted (nats) | {_fmt(js['corrupted'])} |",
    ]
    cosine = diversity.get("weight_cosine_similarity")
    if cosine is not None:
        values = np.asarray(cosine)
        off = values[~np.eye(len(values), dtype=bool)]
        lines.append(
            f"| mean weight cosine similarity (biases excluded) | {_fmt(float(off.mean()) if off.size else None)} |"
        )
    parameters = metrics.get("parameters")
    if parameters is not None:
        lines.append(f"| distinct trained parameters | {parameters:,} |")
    sizes = " | ".join(str(k) for k in range(1, len(diversity["accuracy_by_size"]) + 1))
    lines += [
        "",
        f"By ensemble size: {diversity['by_size']}.",
        "",
        f"| members | {sizes} |",
        "|" + " --- |" * (len(diversity["accuracy_by_size"]) + 1),
        "| accuracy | " + " | ".join(_fmt(v) for v in diversity["accuracy_by_size"]) + " |",
        "| NLL | " + " | ".join(_fmt(v) for v in diversity["nll_by_size"]) + " |",
    ]
    return lines
